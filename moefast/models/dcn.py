"""DCN: first-order weights + cross network v1 (2 layers) + the DNN tower (Wang et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moefast.config import FeatureSpec, NumericSpec, TowerConfig
from moefast.models.base import CTRModel, register
from moefast.nn.interaction import CrossNet
from moefast.ops._backend import BackendLike
from moefast.precision import wide_linear

__all__ = ["DCN"]


@register("dcn")
class DCN(CTRModel):
    """``logit = first_order + w . cross^L(e) + tower(e)``. The cross network and the tower read
    the same embeddings in parallel; DeepCTR-Torch's one linear layer over their concatenation
    is the sum of two linear maps used here. Fields may have different dims."""

    first_order = True

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        num_domains: int,
        tower: TowerConfig,
        *,
        backend: BackendLike = None,
        numeric: Sequence[NumericSpec] = (),
        cross_layers: int = 2,
    ) -> None:
        super().__init__(features, num_domains, tower, backend=backend, numeric=numeric)
        self.cross = CrossNet(self.embedding_width, cross_layers)
        self.cross_output = nn.Linear(self.embedding_width, 1, bias=False)

    def interaction_logit(
        self, features: Mapping[str, torch.Tensor], embedded: torch.Tensor
    ) -> torch.Tensor:
        return wide_linear(self.cross(embedded), self.cross_output).squeeze(-1)

