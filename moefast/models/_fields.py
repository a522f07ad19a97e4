"""Helpers shared by the backbones whose interaction layers read ``[B, F, k]`` field embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moefast.config import FeatureSpec

__all__ = ["as_fields", "shared_dim"]


def shared_dim(model: str, features: Sequence[FeatureSpec]) -> int:
    """The one embedding dim every field has; ``ValueError`` naming the fields otherwise."""
    dims = {f.dim for f in features}
    if len(dims) != 1:
        raise ValueError(
            f"{model}'s interaction layers need one embedding dim for every field, got "
            + ", ".join(f"{f.name}={f.dim}" for f in features)
        )
    return dims.pop()


def as_fields(embedded: torch.Tensor, num_fields: int) -> torch.Tensor:
    """``[B, F k]`` (the embedding collection's output) -> ``[B, F, k]`` (a view).

    ``k`` is spelled out rather than ``-1``: a 0-row batch (a data-parallel slice, an empty
    domain) has no elements from which to infer it.
    """
    return embedded.reshape(embedded.shape[0], num_fields, embedded.shape[1] // num_fields)
