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
from moefast.reference.embedding_optim import (
    FusedOptimizer,
    LazyAdam,
    RowwiseAdagrad,
    check_state,
    state_slots,
    table_key,
)

__all__ = [
    "EmbeddingCollectionFunction",
    "FusedOptimizer",
    "LazyAdam",
    "RowwiseAdagrad",
    "embedding_collection",
]

_POOLING_CODE = {Pooling.NONE: 0, Pooling.SUM: 1, Pooling.MEAN: 2}
_INDEX_IS_64 = {torch.int64: 1, torch.int32: 0}
# The engine's TableType: half tables reach it as they are (never converted), pooled in float32.
_TABLE_TYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class _Recheck(Exception):
    """An input the engine cannot take; check_inputs words the error."""


def _cpu_vector(t: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    if (
        not isinstance(t, torch.Tensor)
        or (dtype is not None and t.dtype != dtype)
        or t.dim() != 1
        or not t.is_contiguous()
        or not t.is_cpu
    ):
        raise _Recheck
    return t


class _NativeCall:
    """One batch packed for the engine: data pointers and sizes per field, built once in
    forward and reused in backward (the tensors are kept alive here).

    Why pointers: importing 52 torch tensors through DLPack costs about 150 us per call, as much
    as a 4096-row lookup; the checks below (dtype, rank, contiguity, device, sizes) cost a tenth
    of that and make every pointer safe to read for the sizes passed along.

    Backward reuses the pointers only after ``snapshot.check_unchanged()``
    (:class:`moefast.reference.embedding.InputSnapshot`): the same storage, shape and dtype for
    every tensor, and the same version counter for what backward reads.
    """

    __slots__ = (
        "batch", "dims", "dtypes", "keep", "meta", "names", "num_indices", "pointers", "snapshot", "vocab_sizes",
    )

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
        psw = per_sample_weights if per_sample_weights is not None else [None] * n
        pads = padding_idx if padding_idx is not None else [None] * n
        self.names = list(names) if names is not None else [f"field{t}" for t in range(n)]
        if n == 0 or not (len(indices) == len(offsets) == len(poolings) == len(psw) == len(pads) == len(self.names) == n):
            raise _Recheck
        first = offsets[0]
        self.batch = int(first.shape[0]) - 1 if first is not None else int(indices[0].shape[0])
        if self.batch < 0:  # 0-length offsets: check_inputs says so
            raise _Recheck
        pointers: list[int] = []
        meta: list[int] = []
        self.dims, self.vocab_sizes, self.num_indices = [], [], []
        self.dtypes: list[torch.dtype] = []
        for t in range(n):
            w, idx, off, p, pad = weights[t], indices[t], offsets[t], psw[t], pads[t]
            if (
                not isinstance(w, torch.Tensor)
                or w.dtype not in _TABLE_TYPE
                or w.dim() != 2
                or not w.is_contiguous()
                or not w.is_cpu
            ):
                raise _Recheck
            idx = _cpu_vector(idx)
            is_64 = _INDEX_IS_64.get(idx.dtype)
            code = _POOLING_CODE.get(poolings[t])
            if is_64 is None or code is None:
                raise _Recheck
            rows, dim = w.shape
            count = idx.shape[0]
            if off is None:
                if code != 0 or count != self.batch:
                    raise _Recheck
            elif code == 0 or _cpu_vector(off, idx.dtype).shape[0] != self.batch + 1:
                raise _Recheck
            if p is not None and (code == 2 or _cpu_vector(p, torch.float32).shape[0] != count):
                raise _Recheck
            if pad is not None and not 0 <= pad < rows:
                raise _Recheck
            pointers += [
                w.data_ptr(),
                idx.data_ptr(),
                off.data_ptr() if off is not None else 0,
                p.data_ptr() if p is not None else 0,
            ]
            meta += [rows, dim, count, is_64, code, -1 if pad is None else pad, _TABLE_TYPE[w.dtype],
                     table_key(self.names[t])]
            self.dims.append(dim)
            self.dtypes.append(w.dtype)
            self.vocab_sizes.append(rows)
            self.num_indices.append(count)
        self.pointers = pointers
        self.meta = meta
        self.keep = (weights, indices, offsets, psw)
        self.snapshot = _ref.InputSnapshot(self.names, weights, indices, offsets, psw)


def _state_pointers(
    optimizer: FusedOptimizer, states: Sequence[dict[str, torch.Tensor]], call: _NativeCall, need: list[bool]
) -> list[int]:
    """Per field (sum, exp_avg, exp_avg_sq, step) pointers, after checking each state tensor:
    the reference's check (slots, dtypes, shapes, the table's device), and contiguity, which the
    engine's raw pointers need."""
    weights = call.keep[0]
    pointers: list[int] = []
    for t, name in enumerate(call.names):
        found = {"sum": 0, "exp_avg": 0, "exp_avg_sq": 0, "step": 0}
        if need[t]:
            check_state(optimizer, states[t], name, weights[t])
            for slot, _, _ in state_slots(optimizer):
                value = states[t][slot]
                if not value.is_contiguous():
                    raise TypeError(f"field {name!r}: optimizer state {slot!r} must be contiguous "
                                    "(use optimizer.init_state(weight))")
                found[slot] = value.data_ptr()
        pointers += [found["sum"], found["exp_avg"], found["exp_avg_sq"], found["step"]]
    return pointers


# Lookups below which a second thread costs more to wake than it saves: the paper preset's
# 6 fields x 1024 rows (about 10 us of work) ran 3% faster per training round on one thread.
LOOKUPS_PER_THREAD = 16384


def _threads(call: _NativeCall) -> int:
    # Sized like torch's intra-op pool, read on every call so torch.set_num_threads applies,
    # and no larger than the work asks for.
    lookups = sum(call.num_indices)
    return max(1, min(torch.get_num_threads(), lookups // LOOKUPS_PER_THREAD))


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
        _ext.native().embedding_forward(call.pointers, call.meta, call.names, call.batch, out, _threads(call))
        ctx.call, ctx.sparse, ctx.optimizer, ctx.states = call, sparse, optimizer, states
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: _NativeCall = ctx.call
        need = list(ctx.needs_input_grad[4:])
        no_grads: list[torch.Tensor | None] = [None] * len(need)
        if not any(need):
            return (None, None, None, None, *no_grads)
        call.snapshot.check_unchanged()
        grad_out = grad_out.contiguous().float()  # autograd may hand an expanded or strided view
        native = _ext.native()
        if ctx.optimizer is not None:
            opt = ctx.optimizer
            is_adam = isinstance(opt, LazyAdam)
            native.embedding_backward_update(
                call.pointers, call.meta, call.names, call.batch, grad_out, need,
                1 if is_adam else 0, opt.lr, opt.eps,
                opt.beta1 if is_adam else 0.0, opt.beta2 if is_adam else 0.0, opt.seed,
                _state_pointers(opt, ctx.states, call, need),
                _threads(call),
            )
            return (None, None, None, None, *no_grads)
        total_ids = sum(call.num_indices)
        rows_all = torch.empty(total_ids, dtype=torch.int64)
        grads_all = torch.empty(sum(n * d for n, d in zip(call.num_indices, call.dims, strict=True)))
        # A half table's gradient is computed in float32 and handed to autograd in the table's
        # dtype (autograd wants the gradient of a tensor in its own dtype).
        counts = native.embedding_backward_rows(
            call.pointers, call.meta, call.names, call.batch, grad_out, need, rows_all, grads_all, _threads(call)
        )
        grads: list[torch.Tensor | None] = []
        row_base = grad_base = 0
        for t, count in enumerate(counts):
            dim, vocab = call.dims[t], call.vocab_sizes[t]
            if need[t]:
                rows = rows_all[row_base : row_base + count]
                values = grads_all[grad_base : grad_base + count * dim].view(count, dim).to(call.dtypes[t])
                if ctx.sparse:
                    grads.append(torch.sparse_coo_tensor(
                        rows[None], values, (vocab, dim), is_coalesced=True, check_invariants=False
                    ))
                else:
                    grads.append(torch.zeros(vocab, dim, dtype=call.dtypes[t]).index_copy_(0, rows, values))
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
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not 0 < w.shape[0] < 2**32:
            return f"it needs tables of 1 to 2^32 - 1 rows, got a table of {w.shape[0]} rows"
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == 0:
            return "it needs tables of at least one column, got a [V, 0] table"
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

    Tables may be float32, float16 or bfloat16 (each element converted exactly, pooled in
    float32); a fused optimizer rounds half tables back stochastically (seeded by its ``seed``).

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
    if optimizer is not None:
        if sparse:
            raise ValueError("sparse=True asks for a gradient, but a fused optimizer consumes it")
        if not isinstance(optimizer, (RowwiseAdagrad, LazyAdam)):
            raise TypeError(f"unknown fused optimizer {optimizer!r}; use RowwiseAdagrad or LazyAdam")
        if optimizer_states is None or len(optimizer_states) != len(weights):
            raise ValueError("a fused optimizer needs optimizer_states: one state dict per table")
    try:
        call = _NativeCall(weights, indices, offsets, poolings, per_sample_weights, padding_idx, names)
    except (_Recheck, TypeError, AttributeError, IndexError):
        # check_inputs words the error, naming the field; it raises for every input the
        # packing refuses (a mismatch would be a bug, reported as such).
        _ref.check_inputs(weights, indices, offsets, poolings, per_sample_weights, padding_idx, names)
        raise AssertionError("embedding_collection: inputs refused by the engine passed check_inputs") from None
    out: torch.Tensor = EmbeddingCollectionFunction.apply(
        call, sparse, optimizer, list(optimizer_states) if optimizer_states is not None else None, *weights
    )
    return out
