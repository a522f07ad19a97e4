"""Table-batched embedding lookup: the C++ engine behind an autograd Function, and dispatch.

The signature and semantics are those of :func:`moefast.reference.embedding.embedding_collection`
(its module docstring describes the input layout), plus ``backend``. The fast path is
``moefast._C.embedding_forward`` / ``embedding_backward_rows`` / ``embedding_backward_update``
(csrc/embedding.cpp); its reference is ``moefast.reference.embedding``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moefast import _ext
from moefast.config import Pooling
from moefast.ops._backend import Backend, BackendLike, resolve_backend
from moefast.reference import embedding as _ref
from moefast.reference.embedding_optim import FusedOptimizer, LazyAdam, RowwiseAdagrad

__all__ = [
    "EmbeddingCollectionFunction",
    "FusedOptimizer",
    "LazyAdam",
    "RowwiseAdagrad",
    "embedding_collection",
]

_POOLING_CODE = {Pooling.NONE: 0, Pooling.SUM: 1, Pooling.MEAN: 2}


class _NativeCall:
    """The argument lists of one engine call, built once in forward and reused in backward."""

    __slots__ = ("args", "batch", "dims", "num_indices", "vocab_sizes", "weights")

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        indices: Sequence[torch.Tensor],
        offsets: Sequence[torch.Tensor | None],
        poolings: Sequence[Pooling],
        per_sample_weights: Sequence[torch.Tensor | None] | None,
        padding_idx: Sequence[int | None] | None,
        names: Sequence[str] | None,
    ) -> None:
        n = len(weights)
        if n == 0:
            raise ValueError("embedding_collection needs at least one field")
        # torch refuses to export a tensor that requires grad through DLPack: pass detached
        # views (same storage, so the fused optimizer's in-place update reaches the parameter).
        self.weights = [w.detach() if isinstance(w, torch.Tensor) else w for w in weights]
        first = offsets[0] if len(offsets) else None
        if first is not None:
            batch = int(first.shape[0]) - 1
        else:
            batch = int(indices[0].shape[0]) if len(indices) else 0
        self.batch = batch
        try:
            pooling_codes = [_POOLING_CODE[p] for p in poolings]
        except (KeyError, TypeError):
            pooling_codes = []  # the C++ length check (or check_inputs) reports it
        self.args: tuple[Any, ...] = (
            self.weights,
            list(indices),
            list(offsets),
            list(per_sample_weights) if per_sample_weights is not None else [None] * n,
            pooling_codes,
            [-1 if p is None else p for p in padding_idx] if padding_idx is not None else [-1] * n,
            list(names) if names is not None else [f"field{t}" for t in range(n)],
            batch,
        )
        self.dims = [int(w.shape[1]) if isinstance(w, torch.Tensor) and w.dim() == 2 else 0 for w in weights]
        self.vocab_sizes = [int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else 0 for w in weights]
        self.num_indices = [int(i.shape[0]) if isinstance(i, torch.Tensor) else 0 for i in indices]


def _threads() -> int:
    # Sized like torch's intra-op pool, read on every call so torch.set_num_threads applies.
    return torch.get_num_threads()


class EmbeddingCollectionFunction(torch.autograd.Function):
    """The table-batched lookup on the C++ engine.

    Forward: ``out[b, col_t : col_t + D_t] = sum_{j in bag b} s_j * W_t[ids_j]`` with
    ``s_j`` the per-sample weight (1 if none), divided by the bag's non-padding count for mean
    pooling. Backward: ``dW_t[r] = sum_{j : ids_j = r} s_j * dout[bag_j, col_t : col_t + D_t]``,
    computed per unique row (sorted ids, each row summed by one task in ascending ``j``, so no
    atomics and no dependence on the thread count). With a fused optimizer the summed row
    gradient updates ``W_t`` and its state in place and no gradient is returned; otherwise it
    becomes a dense ``[V_t, D_t]`` gradient or, when ``sparse``, a coalesced sparse COO one.
    Tables whose ``needs_input_grad`` is false cost no backward work.
    """

    @staticmethod
    def forward(
        ctx: Any,
        call: _NativeCall,
        sparse: bool,
        optimizer: FusedOptimizer | None,
        states: Sequence[dict[str, torch.Tensor]] | None,
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        out = torch.empty(call.batch, sum(call.dims), dtype=torch.float32)
        _ext.native().embedding_forward(*call.args, out, _threads())
        ctx.call, ctx.sparse, ctx.optimizer, ctx.states = call, sparse, optimizer, states
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: _NativeCall = ctx.call
        need = list(ctx.needs_input_grad[4:])
        no_grads: list[torch.Tensor | None] = [None] * len(need)
        if not any(need):
            return (None, None, None, None, *no_grads)
        grad_out = grad_out.contiguous().float()  # autograd may hand an expanded or strided view
        native = _ext.native()
        if ctx.optimizer is not None:
            opt = ctx.optimizer
            states = ctx.states
            is_adam = isinstance(opt, LazyAdam)
            native.embedding_backward_update(
                *call.args, grad_out, need,
                1 if is_adam else 0,
                opt.lr, opt.eps,
                opt.beta1 if is_adam else 0.0, opt.beta2 if is_adam else 0.0,
                [None if is_adam else s["sum"] for s in states],
                [s["exp_avg"] if is_adam else None for s in states],
                [s["exp_avg_sq"] if is_adam else None for s in states],
                [s["step"] if is_adam else None for s in states],
                _threads(),
            )
            return (None, None, None, None, *no_grads)
        total_ids = sum(call.num_indices)
        rows_all = torch.empty(total_ids, dtype=torch.int64)
        grads_all = torch.empty(sum(n * d for n, d in zip(call.num_indices, call.dims, strict=True)))
        counts = native.embedding_backward_rows(*call.args, grad_out, need, rows_all, grads_all, _threads())
        grads: list[torch.Tensor | None] = []
        row_base = grad_base = 0
        for t, count in enumerate(counts):
            dim, vocab = call.dims[t], call.vocab_sizes[t]
            if need[t]:
                rows = rows_all[row_base : row_base + count]
                values = grads_all[grad_base : grad_base + count * dim].view(count, dim)
                if ctx.sparse:
                    grads.append(torch.sparse_coo_tensor(
                        rows[None], values, (vocab, dim), is_coalesced=True, check_invariants=False
                    ))
                else:
                    grads.append(torch.zeros(vocab, dim).index_copy_(0, rows, values))
            else:
                grads.append(None)
            row_base += call.num_indices[t]
            grad_base += call.num_indices[t] * dim
        return (None, None, None, None, *grads)


def _why_not_fast(
    weights: Sequence[torch.Tensor], per_sample_weights: Sequence[torch.Tensor | None] | None
) -> str | None:
    """None when the C++ engine can serve the call, else why not (cheap: no per-id work)."""
    if not _ext.available():
        return "the C++ extension moefast._C is not built"
    for w in weights:
        if isinstance(w, torch.Tensor) and w.device.type != "cpu":
            return f"it runs on CPU tensors only, got a table on {w.device}"
    if per_sample_weights is not None and any(
        p is not None and p.requires_grad for p in per_sample_weights
    ):
        return "gradients w.r.t. per_sample_weights are not implemented in the C++ engine"
    return None


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
    for every other argument; both backends raise the same errors for bad input (``TypeError``
    for a wrong dtype, device or a non-contiguous tensor, ``ValueError`` naming the field and
    value for an id out of range or inconsistent offsets).
    """
    which = resolve_backend("embedding_collection", _why_not_fast(weights, per_sample_weights), backend)
    if which is Backend.REFERENCE:
        return _ref.embedding_collection(
            weights, indices, offsets, poolings, per_sample_weights,
            padding_idx=padding_idx, names=names, sparse=sparse,
            optimizer=optimizer, optimizer_states=optimizer_states,
        )
    # The per-field type checks are Python loops worth about as much as a small lookup, so the
    # engine checks every contract itself; check_inputs runs only to word a TypeError precisely.
    if optimizer is not None:
        if sparse:
            raise ValueError("sparse=True asks for a gradient, but a fused optimizer consumes it")
        if not isinstance(optimizer, (RowwiseAdagrad, LazyAdam)):
            raise TypeError(f"unknown fused optimizer {optimizer!r}; use RowwiseAdagrad or LazyAdam")
        if optimizer_states is None or len(optimizer_states) != len(weights):
            raise ValueError("a fused optimizer needs optimizer_states: one state dict per table")
    try:
        call = _NativeCall(weights, indices, offsets, poolings, per_sample_weights, padding_idx, names)
        out: torch.Tensor = EmbeddingCollectionFunction.apply(
            call, sparse, optimizer, list(optimizer_states) if optimizer_states is not None else None, *weights
        )
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        # Re-check in Python for a message naming the field; re-raise the engine's if it passes.
        _ref.check_inputs(weights, indices, offsets, poolings, per_sample_weights, padding_idx, names)
        if isinstance(exc, (IndexError, AttributeError)):
            raise TypeError(f"embedding_collection: malformed arguments ({exc})") from exc
        raise
    return out
