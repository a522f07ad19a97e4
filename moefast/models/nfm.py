"""NFM: first-order weights + bi-interaction pooling feeding the DNN tower (He & Chua, 2017)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moefast.config import FeatureSpec, TowerConfig
from moefast.models._fields import as_fields, shared_dim
from moefast.models.base import EMBEDDING_INIT_STD, CTRModel, register
from moefast.models.linear import FirstOrder
from moefast.nn.interaction import bi_interaction
from moefast.ops._backend import BackendLike

__all__ = ["NFM"]


@register("nfm")
class NFM(CTRModel):
    """``logit = first_order + tower(bi_interaction(v))``: the tower reads the ``[B, k]`` pooled
    pairwise products, not the raw embeddings (no dropout on the pooling, DeepCTR-Torch's default)."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        num_domains: int,
        tower: TowerConfig,
        *,
        backend: BackendLike = None,
    ) -> None:
        shared_dim("NFM", features)
        super().__init__(features, num_domains, tower, backend=backend)
        self.linear = FirstOrder(self.features, init_std=EMBEDDING_INIT_STD, backend=backend)

    def tower_in_features(self) -> int:
        return self.features[0].dim

    def tower_input(self, embedded: torch.Tensor) -> torch.Tensor:
        return bi_interaction(as_fields(embedded, len(self.features)))  # [B, k]

    def interaction_logit(
        self, features: Mapping[str, torch.Tensor], embedded: torch.Tensor
    ) -> torch.Tensor:
        return self.linear(features)

    def regularized_parameters(self) -> list[nn.Parameter]:
        return [*super().regularized_parameters(), *self.linear.parameters()]
