"""DeepFM: first-order weights + factorisation machine + the DNN tower (Guo et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moefast.config import FeatureSpec, NumericSpec, TowerConfig
from moefast.models._fields import as_fields
from moefast.models.base import CTRModel, register
from moefast.ops._backend import BackendLike

__all__ = ["DeepFM", "fm_interaction"]


def fm_interaction(fields: torch.Tensor) -> torch.Tensor:
    """Second-order FM term ``sum_{i<j} <v_i, v_j>`` of ``fields [B, F, k]`` -> ``[B]``.

    Uses ``((sum_i v_i)^2 - sum_i v_i^2) / 2``, which is O(F k) instead of O(F^2 k).
    """
    square_of_sum = fields.sum(dim=1).pow(2)  # [B, k]
    sum_of_square = fields.pow(2).sum(dim=1)  # [B, k]
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


@register("deepfm")
class DeepFM(CTRModel):
    """``logit = first_order + fm + tower(e)``; every field must share one embedding dim."""

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
        dims = {f.dim for f in features}
        if len(dims) > 1:
            raise ValueError(
                "DeepFM's FM term needs one embedding dim for every field, got "
                + ", ".join(f"{f.name}={f.dim}" for f in features)
            )
        super().__init__(features, num_domains, tower, backend=backend, numeric=numeric)

    def interaction_logit(
        self, features: Mapping[str, torch.Tensor], embedded: torch.Tensor
    ) -> torch.Tensor:
        fields = as_fields(embedded, len(self.features))  # [B, F, k]
        return fm_interaction(fields)

