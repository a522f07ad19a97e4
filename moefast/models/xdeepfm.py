"""xDeepFM: first-order weights + compressed interaction network + the DNN tower (Lian et al., 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moefast.config import FeatureSpec, NumericSpec, TowerConfig
from moefast.models._fields import as_fields, shared_dim
from moefast.models.base import CTRModel, register
from moefast.nn.interaction import CIN
from moefast.ops._backend import BackendLike
from moefast.precision import wide_linear

__all__ = ["XDeepFM"]


@register("xdeepfm")
class XDeepFM(CTRModel):
    """``logit = first_order + w . CIN(v) + tower(e)``; CIN sizes (256, 128) with split-half,
    DeepCTR-Torch's defaults."""

    first_order = True

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        num_domains: int,
        tower: TowerConfig,
        *,
        backend: BackendLike = None,
        numeric: Sequence[NumericSpec] = (),
        cin_sizes: Sequence[int] = (256, 128),
    ) -> None:
        shared_dim("xDeepFM", features)
        super().__init__(features, num_domains, tower, backend=backend, numeric=numeric)
        self.cin = CIN(len(self.features), cin_sizes)
        self.cin_output = nn.Linear(self.cin.output_width, 1, bias=False)

    def interaction_logit(
        self, features: Mapping[str, torch.Tensor], embedded: torch.Tensor
    ) -> torch.Tensor:
        cin = self.cin(as_fields(embedded, len(self.features)))  # [B, output_width]
        return wide_linear(cin, self.cin_output).squeeze(-1)

