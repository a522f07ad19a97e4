"""Table-batched embedding lookup: backend dispatch (reference PyTorch or the C++ engine).

The signature and semantics are those of :func:`moefast.reference.embedding.embedding_collection`
(read its module docstring for the input layout), plus ``backend``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moefast.config import Pooling
from moefast.ops._backend import Backend, BackendLike, resolve_backend
from moefast.reference import embedding as _ref
from moefast.reference.embedding_optim import FusedOptimizer, LazyAdam, RowwiseAdagrad

__all__ = ["FusedOptimizer", "LazyAdam", "RowwiseAdagrad", "embedding_collection"]


def _why_not_fast(weights: Sequence[torch.Tensor]) -> str | None:
    return "the C++ embedding engine is not built yet"


def embedding_collection(
    weights: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    offsets: Sequence[torch.Tensor | None],
    poolings: Sequence[Pooling],
    per_sample_weights: Sequence[torch.Tensor | None] | None = None,
    *,
    padding_idx: Sequence[int | None] | None = None,
    names: Sequence[str] | None = None,
    sparse: bool = False,
    optimizer: FusedOptimizer | None = None,
    optimizer_states: Sequence[dict[str, torch.Tensor]] | None = None,
    backend: BackendLike = None,
) -> torch.Tensor:
    """Look up every field of a batch; float32 ``[B, sum_t D_t]``.

    ``backend``: ``"reference"``, ``"fast"`` (the C++ engine: CPU tensors only) or ``"auto"``
    (default, or ``MOEFAST_BACKEND``). See :func:`moefast.reference.embedding.embedding_collection`
    for every other argument.
    """
    which = resolve_backend("embedding_collection", _why_not_fast(weights), backend)
    assert which is Backend.REFERENCE
    return _ref.embedding_collection(
        weights, indices, offsets, poolings, per_sample_weights,
        padding_idx=padding_idx, names=names, sparse=sparse,
        optimizer=optimizer, optimizer_states=optimizer_states,
    )
