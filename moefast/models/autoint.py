"""AutoInt: first-order weights + stacked multi-head self-attention + the DNN tower (Song et al., 2019)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moefast.config import FeatureSpec, NumericSpec, TowerConfig
from moefast.models._fields import as_fields, shared_dim
from moefast.models.base import CTRModel, register
from moefast.nn.interaction import InteractingLayer
from moefast.ops._backend import BackendLike
from moefast.precision import wide_linear

__all__ = ["AutoInt"]


@register("autoint")
class AutoInt(CTRModel):
    """``logit = first_order + w . flatten(attention^L(v)) + tower(e)``.

    DeepCTR-Torch (the seeds' base) concatenates the attention output with the DNN output
    before one final linear layer; that equals the sum of two linear maps used here (the
    tower's output layer carries the one bias). Defaults: 3 layers of 2 heads with residuals.
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
        attention_layers: int = 3,
        heads: int = 2,
    ) -> None:
        dim = shared_dim("AutoInt", features)
        super().__init__(features, num_domains, tower, backend=backend, numeric=numeric)
        self.attention = nn.ModuleList(InteractingLayer(dim, heads) for _ in range(attention_layers))
        self.attention_output = nn.Linear(len(self.features) * dim, 1, bias=False)

    def interaction_logit(
        self, features: Mapping[str, torch.Tensor], embedded: torch.Tensor
    ) -> torch.Tensor:
        h = as_fields(embedded, len(self.features))  # [B, F, k]
        for layer in self.attention:
            h = layer(h)
        return wide_linear(h.flatten(1), self.attention_output).squeeze(-1)

