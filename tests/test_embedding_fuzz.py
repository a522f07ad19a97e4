"""Bounded differential fuzzing of the C++ embedding engine against the reference (issue 15).

Hypothesis draws whole calls: 1 to 4 fields, gathers and sum / mean bags (empty bags and empty
batches included), int32 / int64 ids, per-sample weights, padding ids, tables shared by several
fields, and every gradient mode (dense, sparse, fused row-wise Adagrad, fused lazy Adam, two
steps so optimizer state matters), on one thread or split into one task per field. Some calls
carry an id out of range: both backends must then raise the same ``ValueError``. Otherwise the
outputs, gradients, updated tables and optimizer states must agree. ``make sanitize`` runs this
under ASan + UBSan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moefast import _ext
from moefast.config import Pooling
from moefast.ops import embedding as ops_embedding
from moefast.ops import embedding_collection
from moefast.reference.embedding_optim import FusedOptimizer, LazyAdam, RowwiseAdagrad
from moefast.testing import tolerance

pytestmark = pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")
TOL = tolerance(torch.float32)
MODES = ["dense", "sparse", "adagrad", "adam"]


@dataclass
class Call:
    batch: int
    tables: list[tuple[int, int]]  # (rows, dim) per distinct table
    table_of: list[int]  # field -> table
    indices: list[torch.Tensor]
    offsets: list[torch.Tensor | None]
    poolings: list[Pooling]
    psw: list[torch.Tensor | None]
    padding: list[int | None]
    bad: tuple[int, int] | None  # (field, position) given an id out of range
    mode: str
    split_tasks: bool
    seed: int


@st.composite
def calls(draw: Any) -> Call:
    batch = draw(st.integers(0, 12))
    n_fields = draw(st.integers(1, 4))
    tables: list[tuple[int, int]] = []
    table_of: list[int] = []
    indices: list[torch.Tensor] = []
    offsets: list[torch.Tensor | None] = []
    poolings: list[Pooling] = []
    psw: list[torch.Tensor | None] = []
    padding: list[int | None] = []
    for _ in range(n_fields):
        if tables and draw(st.booleans()):  # reuse an earlier table: one table, several fields
            table = draw(st.integers(0, len(tables) - 1))
        else:
            tables.append((draw(st.integers(1, 30)), draw(st.sampled_from([1, 3, 4, 8, 16]))))
            table = len(tables) - 1
        table_of.append(table)
        rows = tables[table][0]
        dtype = draw(st.sampled_from([torch.int32, torch.int64]))
        pooling = draw(st.sampled_from(list(Pooling)))
        if pooling is Pooling.NONE:
            sizes = [1] * batch
            offsets.append(None)
        else:
            sizes = draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch))
            offsets.append(torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=dtype))
        count = sum(sizes)
        indices.append(torch.tensor(draw(st.lists(st.integers(0, rows - 1), min_size=count, max_size=count)), dtype=dtype))
        poolings.append(pooling)
        weighted = pooling is not Pooling.MEAN and draw(st.booleans())
        psw.append(torch.tensor(draw(st.lists(st.floats(-2, 2, width=32), min_size=count, max_size=count)),
                                dtype=torch.float32) if weighted else None)
        padding.append(draw(st.integers(0, rows - 1)) if draw(st.booleans()) else None)
    bad = None
    counts = [int(i.numel()) for i in indices]
    if any(counts) and draw(st.integers(0, 5)) == 0:
        field = draw(st.sampled_from([t for t, c in enumerate(counts) if c]))
        bad = (field, draw(st.integers(0, counts[field] - 1)))
    return Call(batch, tables, table_of, indices, offsets, poolings, psw, padding, bad,
                draw(st.sampled_from(MODES)), draw(st.booleans()), draw(st.integers(0, 2**16)))


def _optimizer(mode: str) -> FusedOptimizer | None:
    return {"adagrad": RowwiseAdagrad(lr=0.05), "adam": LazyAdam(lr=0.02)}.get(mode)


def _run(call: Call, backend: str) -> tuple[Any, ...]:
    """Two steps of lookup + backward; returns what each backend must agree on."""
    gen = torch.Generator().manual_seed(call.seed)
    tables = [torch.randn(rows, dim, generator=gen).requires_grad_() for rows, dim in call.tables]
    weights = [tables[t] for t in call.table_of]
    optimizer = _optimizer(call.mode)
    table_states = [optimizer.init_state(w) for w in tables] if optimizer is not None else None
    states = [table_states[t] for t in call.table_of] if table_states is not None else None
    indices = [i.clone() for i in call.indices]
    if call.bad is not None:
        field, position = call.bad
        indices[field][position] = call.tables[call.table_of[field]][0]  # one past the end
    outs, grads = [], []
    for _ in range(2):
        out = embedding_collection(
            weights, indices, call.offsets, call.poolings, call.psw, padding_idx=call.padding,
            sparse=call.mode == "sparse", optimizer=optimizer, optimizer_states=states, backend=backend,
        )
        grad_out = torch.randn(out.shape, generator=gen)
        (out * grad_out).sum().backward()
        outs.append(out.detach())
        for w in tables:
            if w.grad is not None:
                grads.append(w.grad.to_dense() if w.grad.is_sparse else w.grad.clone())
                w.grad = None
    return outs, grads, [w.detach() for w in tables], table_states


@settings(max_examples=60, deadline=None)
@given(call=calls())
def test_engine_matches_reference(call: Call) -> None:
    old_threads, old_split = torch.get_num_threads(), ops_embedding.LOOKUPS_PER_THREAD
    torch.set_num_threads(2)
    ops_embedding.LOOKUPS_PER_THREAD = 1 if call.split_tasks else old_split  # many tasks, two threads
    try:
        if call.bad is not None:
            errors = []
            for backend in ("reference", "fast"):
                with pytest.raises(ValueError) as info:
                    _run(call, backend)
                errors.append(str(info.value))
            assert errors[0] == errors[1]
            return
        expected = _run(call, "reference")
        got = _run(call, "fast")
    finally:
        torch.set_num_threads(old_threads)
        ops_embedding.LOOKUPS_PER_THREAD = old_split
    torch.testing.assert_close(got, expected, rtol=TOL.rtol, atol=TOL.atol)
