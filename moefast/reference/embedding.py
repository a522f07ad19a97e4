"""Table-batched embedding lookup in plain PyTorch: the specification of the C++ engine.

One call looks up every categorical field of a batch (as FBGEMM's table-batched embedding
does). Field ``t`` has a table ``weights[t]`` (float32, float16 or bfloat16 ``[V_t, D_t]``; a
half table's rows are converted exactly to float32 and pooled in float32) and jagged input:

- ``indices[t]``: int32 or int64 ``[N_t]``, ids in ``[0, V_t)``;
- ``offsets[t]``: ``None`` for a single-valued field (``N_t == B``, a plain gather), else
  ``[B + 1]`` of the dtype of ``indices[t]`` with ``offsets[0] == 0``, non-decreasing,
  ``offsets[B] == N_t``: bag ``b``
  holds ``indices[t][offsets[b]:offsets[b + 1]]`` (an empty bag gives a zero vector);
- ``per_sample_weights[t]``: ``None`` or float32 ``[N_t]`` multiplying each looked-up row
  (sum pooling and single-valued fields only, as in ``torch.nn.functional.embedding_bag``);
- ``padding_idx[t]``: ``None`` or an id that is skipped: it contributes nothing, receives no
  gradient, and does not count towards a mean.

The output is float32 ``[B, sum_t D_t]``: the fields' vectors concatenated in field order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from moefast.config import Pooling
from moefast.reference.embedding_optim import (
    TABLE_DTYPES,
    FusedOptimizer,
    check_state,
    sparse_update_,
    table_key,
)

__all__ = [
    "FieldLayout",
    "InputSnapshot",
    "check_inputs",
    "embedding_collection",
    "embedding_collection_row_grads",
    "table_groups",
]

_INDEX_DTYPES = (torch.int32, torch.int64)


class FieldLayout:
    """The validated, per-call description of every field (no tensor data is copied)."""

    __slots__ = (
        "batch_size",
        "dims",
        "indices",
        "names",
        "offsets",
        "padding_idx",
        "per_sample_weights",
        "poolings",
        "vocab_sizes",
    )

    def __init__(
        self,
        batch_size: int,
        names: list[str],
        vocab_sizes: list[int],
        dims: list[int],
        indices: list[torch.Tensor],
        offsets: list[torch.Tensor | None],
        poolings: list[Pooling],
        per_sample_weights: list[torch.Tensor | None],
        padding_idx: list[int | None],
    ) -> None:
        self.batch_size = batch_size
        self.names = names
        self.vocab_sizes = vocab_sizes
        self.dims = dims
        self.indices = indices
        self.offsets = offsets
        self.poolings = poolings
        self.per_sample_weights = per_sample_weights
        self.padding_idx = padding_idx


def _versions(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Each tensor's version counter (bumped by every in-place op); -1 for an inference tensor,
    which has none (and cannot be changed outside inference mode)."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return [-1 if t.is_inference() else t._version for t in tensors]


class InputSnapshot:
    """What a backward relies on, recorded in forward and checked before backward uses it.

    torch's rule for saved tensors (a tensor that backward reads must not have been changed in
    place since forward: its version counter) applied to what the embedding backward reads, the
    ids, offsets and per-sample weights, plus storage identity (the same data pointer, shape and
    dtype) of those and of the tables, which a fused optimizer writes: a table whose ``.data`` was
    replaced, whose dtype changed (``module.double()``) or whose storage was freed is refused
    rather than written through a stale pointer. In-place edits of a table's values are allowed:
    backward does not read them, and the fused update applies to the current values.
    """

    __slots__ = ("indices", "names", "offsets", "per_sample_weights", "read", "read_pointers", "read_versions",
                 "weight_dtypes", "weight_pointers", "weight_shapes", "weights")

    def __init__(
        self,
        names: Sequence[str],
        weights: Sequence[torch.Tensor],
        indices: Sequence[torch.Tensor],
        offsets: Sequence[torch.Tensor | None],
        per_sample_weights: Sequence[torch.Tensor | None],
    ) -> None:
        # Kept lean (about 1 us per field): it runs on every training step.
        self.names, self.weights = names, weights
        self.indices, self.offsets, self.per_sample_weights = indices, offsets, per_sample_weights
        self.weight_pointers = [w.data_ptr() for w in weights]
        self.weight_shapes = [w.shape for w in weights]
        self.weight_dtypes = [w.dtype for w in weights]
        self.read = [x for group in (indices, offsets, per_sample_weights) for x in group if x is not None]
        self.read_pointers = [x.data_ptr() for x in self.read]
        self.read_versions = _versions(self.read)

    def check_unchanged(self) -> None:
        """``RuntimeError`` naming the field and tensor if anything changed since forward."""
        weights = self.weights
        if (
            [w.data_ptr() for w in weights] != self.weight_pointers
            or [w.shape for w in weights] != self.weight_shapes
            or [w.dtype for w in weights] != self.weight_dtypes
            or any(not w.is_contiguous() for w in weights)
        ):
            for t, w in enumerate(weights):
                if (
                    w.data_ptr() != self.weight_pointers[t]
                    or w.dtype != self.weight_dtypes[t]
                    or w.shape != self.weight_shapes[t]
                    or not w.is_contiguous()
                ):
                    raise RuntimeError(
                        f"embedding_collection backward: field {self.names[t]!r}: its table changed "
                        f"between forward and backward (now {w.dtype} {tuple(w.shape)}: its .data was "
                        "replaced, its dtype or shape changed, or its storage was freed); backward will "
                        "not write through the forward's pointer. Run forward again after changing a table."
                    )
        versions = _versions(self.read)
        if versions == self.read_versions and [x.data_ptr() for x in self.read] == self.read_pointers:
            return
        labelled = [
            (t, what, x)
            for what, group in (("indices", self.indices), ("offsets", self.offsets),
                                ("per_sample_weights", self.per_sample_weights))
            for t, x in enumerate(group)
            if x is not None
        ]
        for (t, what, x), ptr, before, after in zip(
            labelled, self.read_pointers, self.read_versions, versions, strict=True
        ):
            if before != after or x.data_ptr() != ptr:
                raise RuntimeError(
                    f"embedding_collection backward: field {self.names[t]!r}: its {what} were modified "
                    f"in place or replaced after forward (version {before} -> {after}); the gradient "
                    "would go to other rows. Run forward again instead of editing the ids."
                )


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def table_groups(
    weights: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    need: Sequence[bool],
    names: Sequence[str],
) -> list[list[int]]:
    """The fields a fused optimizer updates, grouped by table (field order within a group).

    Fields whose tables are the same memory (same data pointer and shape) form one group and
    must share their optimizer state; the table is then updated once per row with the gradient
    summed over the group's fields. Any other overlap between what two groups write (two views
    of one tensor, one state for two tables) is a ``ValueError``: the C++ engine's tasks would
    race on it, and which update wins would be arbitrary. The C++ engine applies the same rule.
    """
    groups: list[list[int]] = []
    first_of: dict[int, int] = {}
    ranges: list[tuple[int, int, int]] = []  # (start, end, field)
    for t, w in enumerate(weights):
        if not need[t]:
            continue
        g = first_of.get(w.data_ptr())
        if g is not None:
            o = groups[g][0]
            if tuple(weights[o].shape) != tuple(w.shape):
                raise ValueError(
                    f"field {names[o]!r} and field {names[t]!r}: tables start at the same address "
                    "with different shapes"
                )
            mine, theirs = states[t], states[o]
            if sorted(mine) != sorted(theirs) or any(mine[k].data_ptr() != theirs[k].data_ptr() for k in mine):
                raise ValueError(
                    f"field {names[o]!r} and field {names[t]!r} share a table but not its optimizer "
                    "state: pass the same state for every field of one table"
                )
            groups[g].append(t)
            continue
        first_of[w.data_ptr()] = len(groups)
        groups.append([t])
        ranges += [(*_byte_range(x), t) for x in (w, *states[t].values()) if x.numel()]
    ranges.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(ranges):
        if start < end:
            raise ValueError(
                f"field {names[a]!r}: its table and optimizer state overlap in memory" if a == b else
                f"field {names[a]!r} and field {names[b]!r}: their tables or optimizer states overlap "
                "in memory; a table listed for several fields must be the same tensor, with the same state"
            )
    return groups


def _check_tensor(
    t: Any, what: str, dtypes: tuple[torch.dtype, ...], ndim: int, device: torch.device
) -> torch.Tensor:
    """TypeError unless ``t`` is a contiguous tensor of one of ``dtypes``, ``ndim`` dims, on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{what} must be {names}, got {t.dtype}")
    if t.dim() != ndim:
        raise TypeError(f"{what} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.device != device:
        raise TypeError(f"{what} is on {t.device}, but its table is on {device}")
    if not t.is_contiguous():
        raise TypeError(f"{what} must be contiguous (it is never copied silently)")
    return t


def check_inputs(
    weights: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    offsets: Sequence[torch.Tensor | None],
    poolings: Sequence[Pooling],
    per_sample_weights: Sequence[torch.Tensor | None] | None,
    padding_idx: Sequence[int | None] | None,
    names: Sequence[str] | None,
) -> FieldLayout:
    """Check types, shapes and devices of every field; ``TypeError`` / ``ValueError`` naming it.

    Value checks that need the data (ids in range, offsets consistent) are left to the caller:
    :func:`check_values` in the reference path, the C++ engine in the fast path.
    """
    n = len(weights)
    if n == 0:
        raise ValueError("embedding_collection needs at least one field")
    names = list(names) if names is not None else [f"field{t}" for t in range(n)]
    psw: list[torch.Tensor | None] = list(per_sample_weights) if per_sample_weights is not None else [None] * n
    pads: list[int | None] = list(padding_idx) if padding_idx is not None else [None] * n
    for what, seq in (
        ("indices", indices), ("offsets", offsets), ("poolings", poolings),
        ("per_sample_weights", psw), ("padding_idx", pads), ("names", names),
    ):
        if len(seq) != n:
            raise ValueError(f"{what} has {len(seq)} entries for {n} tables")
    batch_size: int | None = None
    for t in range(n):
        name = names[t]
        w = weights[t]
        if not isinstance(w, torch.Tensor) or w.dtype not in TABLE_DTYPES or w.dim() != 2:
            desc = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise TypeError(
                f"field {name!r}: table must be a float32, float16 or bfloat16 [V, D] tensor, got {desc}"
            )
        if not w.is_contiguous():
            raise TypeError(f"field {name!r}: table must be contiguous (it is never copied silently)")
        idx = _check_tensor(indices[t], f"field {name!r}: indices", _INDEX_DTYPES, 1, w.device)
        pooling = poolings[t]
        if not isinstance(pooling, Pooling):
            raise TypeError(f"field {name!r}: pooling must be a Pooling, got {pooling!r}")
        off = offsets[t]
        if pooling is Pooling.NONE:
            if off is not None:
                raise ValueError(f"field {name!r}: a single-valued field (Pooling.NONE) takes no offsets")
            bags = int(idx.shape[0])
        else:
            if off is None:
                raise ValueError(f"field {name!r}: a pooled field ({pooling}) needs offsets [B + 1]")
            off = _check_tensor(off, f"field {name!r}: offsets", (idx.dtype,), 1, w.device)
            if off.shape[0] < 1:
                raise ValueError(f"field {name!r}: offsets must have B + 1 >= 1 entries, got 0")
            bags = int(off.shape[0]) - 1
        if batch_size is None:
            batch_size = bags
        elif bags != batch_size:
            raise ValueError(f"field {name!r} has {bags} samples, field {names[0]!r} has {batch_size}")
        p = psw[t]
        if p is not None:
            _check_tensor(p, f"field {name!r}: per_sample_weights", (torch.float32,), 1, w.device)
            if pooling is Pooling.MEAN:
                raise ValueError(f"field {name!r}: per_sample_weights need sum pooling, not mean")
            if p.shape[0] != idx.shape[0]:
                raise ValueError(
                    f"field {name!r}: per_sample_weights has {p.shape[0]} entries for {idx.shape[0]} indices"
                )
        pad = pads[t]
        if pad is not None and not 0 <= pad < w.shape[0]:
            raise ValueError(f"field {name!r}: padding_idx {pad} outside [0, {w.shape[0]})")
    assert batch_size is not None
    return FieldLayout(
        batch_size,
        names,
        [int(w.shape[0]) for w in weights],
        [int(w.shape[1]) for w in weights],
        list(indices),
        list(offsets),
        list(poolings),
        psw,
        pads,
    )


def check_values(layout: FieldLayout) -> None:
    """``ValueError`` naming the field and value for an id out of range or inconsistent offsets."""
    for t, name in enumerate(layout.names):
        idx = layout.indices[t]
        vocab = layout.vocab_sizes[t]
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"field {name!r}: id {lo if lo < 0 else hi} outside [0, {vocab})")
        off = layout.offsets[t]
        if off is not None:
            n = int(idx.shape[0])
            if int(off[0]) != 0 or int(off[-1]) != n or bool((off[1:] < off[:-1]).any()):
                raise ValueError(
                    f"field {name!r}: offsets must start at 0, never decrease and end at "
                    f"len(indices) = {n}; got first {int(off[0])}, last {int(off[-1])}"
                )


def _bag_of(layout: FieldLayout, t: int) -> torch.Tensor:
    """int64 ``[N_t]``: the sample each index of field ``t`` belongs to."""
    idx = layout.indices[t]
    off = layout.offsets[t]
    samples = torch.arange(layout.batch_size, device=idx.device)
    if off is None:
        return samples
    return torch.repeat_interleave(samples, (off[1:] - off[:-1]).long())


def _scales(layout: FieldLayout, t: int, bag_of: torch.Tensor) -> torch.Tensor:
    """float32 ``[N_t]``: what each looked-up row is multiplied by before the bag sum."""
    idx = layout.indices[t]
    p = layout.per_sample_weights[t]
    scale = p.clone() if p is not None else torch.ones(idx.shape[0], device=idx.device)
    pad = layout.padding_idx[t]
    kept = (idx != pad).float() if pad is not None else torch.ones_like(scale)
    scale = scale * kept
    if layout.poolings[t] is Pooling.MEAN:
        counts = torch.zeros(layout.batch_size, device=idx.device).index_add_(0, bag_of, kept)
        scale = scale / counts.clamp(min=1)[bag_of]  # an all-padding bag stays a zero vector
    return scale


def _lookup(
    weights: Sequence[torch.Tensor], layout: FieldLayout, sparse: bool
) -> torch.Tensor:
    """The forward: float32 ``[B, sum D]``, differentiable w.r.t. ``weights``."""
    outs = []
    for t, w in enumerate(weights):
        bag_of = _bag_of(layout, t)
        rows = F.embedding(layout.indices[t].long(), w, sparse=sparse)  # [N_t, D_t], w's dtype
        contrib = rows.float() * _scales(layout, t, bag_of)[:, None]  # exact for half rows
        outs.append(contrib.new_zeros(layout.batch_size, w.shape[1]).index_add(0, bag_of, contrib))
    return torch.cat(outs, dim=1)


def embedding_collection_row_grads(
    grad_out: torch.Tensor, layout: FieldLayout
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The backward as unique rows: per field, ``(rows int64 [U_t], grads float32 [U_t, D_t])``.

    ``grad_out`` is float32 ``[B, sum D]``. ``rows`` is sorted ascending without repeats (ids
    equal to ``padding_idx`` left out); ``grads[u]`` sums every lookup of ``rows[u]`` in the batch.
    """
    result = []
    col = 0
    for t, dim in enumerate(layout.dims):
        idx = layout.indices[t].long()
        bag_of = _bag_of(layout, t)
        scale = _scales(layout, t, bag_of)
        contrib = grad_out[bag_of, col : col + dim] * scale[:, None]  # [N_t, D_t]
        keep = idx != layout.padding_idx[t] if layout.padding_idx[t] is not None else slice(None)
        rows, inverse = torch.unique(idx[keep], sorted=True, return_inverse=True)
        grads = grad_out.new_zeros(rows.shape[0], dim).index_add_(0, inverse, contrib[keep])
        result.append((rows, grads))
        col += dim
    return result


class _FusedUpdateFunction(torch.autograd.Function):
    """Forward: the lookup. Backward: the optimizer step on the rows seen; no weight gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        layout: FieldLayout,
        optimizer: FusedOptimizer,
        states: Sequence[dict[str, torch.Tensor]],
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        ctx.layout, ctx.optimizer, ctx.states, ctx.weights = layout, optimizer, states, weights
        ctx.snapshot = InputSnapshot(layout.names, weights, layout.indices, layout.offsets, layout.per_sample_weights)
        with torch.no_grad():
            return _lookup(weights, layout, sparse=False)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, ...]:
        need = ctx.needs_input_grad[3:]  # frozen tables are not updated
        if any(need):
            ctx.snapshot.check_unchanged()
            groups = table_groups(ctx.weights, ctx.states, need, ctx.layout.names)
            row_grads = embedding_collection_row_grads(grad_out.contiguous(), ctx.layout)
            for group in groups:
                t = group[0]
                rows, grads = row_grads[t]
                if len(group) > 1:  # a shared table: one update per row, gradients summed in field order
                    rows, inverse = torch.unique(torch.cat([row_grads[u][0] for u in group]), return_inverse=True)
                    grads = grads.new_zeros(rows.shape[0], grads.shape[1]).index_add_(
                        0, inverse, torch.cat([row_grads[u][1] for u in group])
                    )
                sparse_update_(ctx.weights[t].data, ctx.states[t], rows, grads, ctx.optimizer,
                               key=table_key(ctx.layout.names[t]))
        return (None,) * (3 + len(ctx.weights))


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
) -> torch.Tensor:
    """Look up every field of a batch; float32 ``[B, sum_t D_t]`` (see the module docstring).

    Without ``optimizer``, ``weights`` get an ordinary autograd gradient: dense ``[V, D]``, or a
    sparse COO tensor when ``sparse``. With ``optimizer`` (and ``optimizer_states``: one
    ``optimizer.init_state(w)`` dict per table), backward applies the update in place to the
    rows of the batch and leaves ``weights[t].grad`` untouched; tables that do not require grad
    are not updated. A table listed for several fields (the same tensor, with the same state) is
    updated once per row, with the gradient summed over those fields.
    """
    layout = check_inputs(weights, indices, offsets, poolings, per_sample_weights, padding_idx, names)
    check_values(layout)
    if optimizer is None:
        return _lookup(weights, layout, sparse)
    if sparse:
        raise ValueError("sparse=True asks for a gradient, but a fused optimizer consumes it")
    if optimizer_states is None or len(optimizer_states) != len(weights):
        raise ValueError("a fused optimizer needs optimizer_states: one state dict per table")
    for weight, state, name in zip(weights, optimizer_states, layout.names, strict=True):
        if weight.requires_grad:  # as the fast path: only the tables it updates
            check_state(optimizer, state, name, weight)
    out: torch.Tensor = _FusedUpdateFunction.apply(layout, optimizer, list(optimizer_states), *weights)
    return out
