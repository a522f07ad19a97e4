"""PNN with inner products (IPNN): the tower reads embeddings and pairwise inner products (Qu et al., 2016)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moefast.config import FeatureSpec, NumericSpec, TowerConfig
from moefast.models._fields import as_fields, shared_dim
from moefast.models.base import CTRModel, register
from moefast.nn.interaction import inner_products
from moefast.ops._backend import BackendLike

__all__ = ["PNN"]


@register("pnn")
class PNN(CTRModel):
    """``logit = tower([e, <v_i, v_j> for i < j])``; no first-order part (as DeepCTR-Torch's PNN)."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        num_domains: int,
        tower: TowerConfig,
        *,
        backend: BackendLike = None,
        numeric: Sequence[NumericSpec] = (),
    ) -> None:
        shared_dim("PNN", features)
        super().__init__(features, num_domains, tower, backend=backend, numeric=numeric)

    def tower_in_features(self) -> int:
        num_fields = len(self.features)
        return self.embedding_width + num_fields * (num_fields - 1) // 2

    def tower_input(self, embedded: torch.Tensor) -> torch.Tensor:
        products = inner_products(as_fields(embedded, len(self.features)))  # [B, F (F - 1) / 2]
        return torch.cat([embedded, products], dim=1)
