"""First-order (``wide``/linear) part shared by DeepFM and WDL: one scalar weight per id."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from moefast.config import FeatureSpec
from moefast.nn.embedding import EmbeddingCollection
from moefast.ops._backend import BackendLike

__all__ = ["FirstOrder"]


class FirstOrder(nn.Module):
    """``sum_f w_f[id_f]``: a dim-1 embedding per field (pooled like the field), summed.

    No bias: the one bias of a model lives in its tower's output layer.
    """

    def __init__(
        self, features: Sequence[FeatureSpec], *, init_std: float, backend: BackendLike = None
    ) -> None:
        super().__init__()
        self.weights = EmbeddingCollection(
            [replace(f, dim=1) for f in features], init_std=init_std, backend=backend
        )

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """-> float32 ``[B]``."""
        return self.weights(features).sum(dim=1)
