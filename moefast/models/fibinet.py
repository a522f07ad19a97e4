"""FiBiNET: first-order weights + SENET and bilinear interaction feeding the DNN tower (Huang et al., 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moefast.config import FeatureSpec, NumericSpec, TowerConfig
from moefast.models._fields import as_fields, shared_dim
from moefast.models.base import CTRModel, register
from moefast.nn.interaction import SENET, BilinearInteraction
from moefast.ops._backend import BackendLike

__all__ = ["FiBiNET"]


@register("fibinet")
class FiBiNET(CTRModel):
    """``logit = first_order + tower([bilinear(senet(v)), bilinear(v)])``.

    One bilinear layer serves both the SENET-reweighted and the raw embeddings, as in
    DeepCTR-Torch (FuxiCTR uses two); "interaction" type (one ``W`` per pair), reduction 3.
    """

    first_order = True

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        num_domains: int,
        tower: TowerConfig,
        *,
        backend: BackendLike = None,
        numeric: Sequence[NumericSpec] = (),
        reduction: int = 3,
    ) -> None:
        dim = shared_dim("FiBiNET", features)
        if len(features) < 2:
            raise ValueError(f"FiBiNET needs at least 2 fields, got {len(features)}")
        super().__init__(features, num_domains, tower, backend=backend, numeric=numeric)
        self.senet = SENET(len(self.features), reduction)
        self.bilinear = BilinearInteraction(len(self.features), dim)

    def tower_in_features(self) -> int:
        num_fields = len(self.features)
        return num_fields * (num_fields - 1) * self.features[0].dim  # two sets of F(F-1)/2 pairs

    def tower_input(self, embedded: torch.Tensor) -> torch.Tensor:
        fields = as_fields(embedded, len(self.features))  # [B, F, k]
        both = torch.cat([self.bilinear(self.senet(fields)), self.bilinear(fields)], dim=1)
        return both.flatten(1)  # [B, F (F - 1) k]

