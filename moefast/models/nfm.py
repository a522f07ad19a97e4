"""NFM: first-order weights + bi-interaction pooling feeding the DNN tower (He & Chua, 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moefast.config import FeatureSpec, NumericSpec, TowerConfig
from moefast.models._fields import as_fields, shared_dim
from moefast.models.base import CTRModel, register
from moefast.nn.interaction import bi_interaction
from moefast.ops._backend import BackendLike

__all__ = ["NFM"]


@register("nfm")
class NFM(CTRModel):
    """``logit = first_order + tower(bi_interaction(v))``: the tower reads the ``[B, k]`` pooled
    pairwise products, not the raw embeddings (no dropout on the pooling, DeepCTR-Torch's default)."""

    first_order = True

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        num_domains: int,
        tower: TowerConfig,
        *,
        backend: BackendLike = None,
        numeric: Sequence[NumericSpec] = (),
    ) -> None:
        shared_dim("NFM", features)
        super().__init__(features, num_domains, tower, backend=backend, numeric=numeric)

    def tower_in_features(self) -> int:
        return self.features[0].dim

    def tower_input(self, embedded: torch.Tensor) -> torch.Tensor:
        return bi_interaction(as_fields(embedded, len(self.features)))  # [B, k]

