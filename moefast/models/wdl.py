"""Wide & Deep: a wide (first-order) part + the DNN tower (Cheng et al., 2016)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moefast.config import FeatureSpec, TowerConfig
from moefast.models.base import EMBEDDING_INIT_STD, CTRModel, register
from moefast.models.linear import FirstOrder
from moefast.ops._backend import BackendLike

__all__ = ["WDL"]


@register("wdl")
class WDL(CTRModel):
    """``logit = wide + tower(e)``. As in the seeds' code, the wide part reads the same sparse
    fields as the deep part (no hand-made cross features)."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        num_domains: int,
        tower: TowerConfig,
        *,
        backend: BackendLike = None,
    ) -> None:
        super().__init__(features, num_domains, tower, backend=backend)
        self.linear = FirstOrder(self.features, init_std=EMBEDDING_INIT_STD, backend=backend)

    def interaction_logit(
        self, features: Mapping[str, torch.Tensor], embedded: torch.Tensor
    ) -> torch.Tensor:
        return self.linear(features)

    def regularized_parameters(self) -> list[nn.Parameter]:
        return [*super().regularized_parameters(), *self.linear.parameters()]
