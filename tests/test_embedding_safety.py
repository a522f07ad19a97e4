"""The embedding engine's memory safety (issue 15): what changed between forward and backward is
refused, a table listed for several fields is updated once per row, the thread pool survives
fork, and calls the engine cannot serve are refused up front or routed to the reference.

The shared-table oracle is torch's own gradient (a dense ``F.embedding`` gradient of the table
used for every field) fed to :mod:`moefast.reference.embedding_optim`'s update, independent of
both backends.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from moefast import _ext
from moefast.config import FeatureSpec, Pooling
from moefast.nn import EmbeddingCollection
from moefast.ops import embedding as ops_embedding
from moefast.ops import embedding_collection
from moefast.ops._backend import BackendUnavailableError
from moefast.reference.embedding_optim import (
    FusedOptimizer,
    LazyAdam,
    RowwiseAdagrad,
    sparse_update_,
)
from moefast.testing import tolerance

needs_ext = pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")
FAST = pytest.param("fast", marks=needs_ext)
BACKENDS = ["reference", FAST]
OPTIMIZERS: list[FusedOptimizer] = [RowwiseAdagrad(lr=0.1), LazyAdam(lr=0.05)]
TOL = tolerance(torch.float32)


def _lookup(backend: str, optimizer: FusedOptimizer | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One gather field and one sum bag through the op: (table, ids of the bag, output)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 4))
    ids = torch.tensor([1, 5, 5, 7, 2])
    offsets = torch.tensor([0, 2, 5])
    states = [optimizer.init_state(w)] * 2 if optimizer is not None else None
    out = embedding_collection(
        [w, w], [torch.tensor([3, 4]), ids], [None, offsets], [Pooling.NONE, Pooling.SUM],
        names=["item", "history"], optimizer=optimizer, optimizer_states=states, backend=backend,
    )
    return w, ids, out


def _replace_data(w: torch.Tensor) -> None:
    w.data = torch.randn(3, 4)


def _change_dtype(w: torch.Tensor) -> None:
    w.data = w.data.double()


def _free_storage(w: torch.Tensor) -> None:
    w.untyped_storage().resize_(0)


TABLE_CHANGES: dict[str, Callable[[torch.Tensor], None]] = {
    ".data replaced": _replace_data,
    "dtype changed": _change_dtype,
    "storage freed": _free_storage,
}


@pytest.mark.parametrize("optimizer", [None, *OPTIMIZERS], ids=["grad", "adagrad", "adam"])
@pytest.mark.parametrize("change", list(TABLE_CHANGES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_table_changed_before_backward_is_refused(backend: str, change: str, optimizer: FusedOptimizer | None) -> None:
    # Without the check the fast path wrote through the forward's pointer: a segfault after a
    # dtype change, a write into freed memory after .data was replaced.
    if backend == "reference" and optimizer is None:
        pytest.skip("the reference without a fused optimizer is plain torch autograd (no custom backward)")
    w, _, out = _lookup(backend, optimizer)
    TABLE_CHANGES[change](w)
    with pytest.raises(RuntimeError, match=r"field 'item': its table changed between forward and backward"):
        out.sum().backward()


@needs_ext
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["adagrad", "adam"])
def test_module_dtype_changed_before_backward_is_refused(optimizer: FusedOptimizer) -> None:
    module = EmbeddingCollection([FeatureSpec("uid", 50, 8)], backend="fast", optimizer=optimizer)
    out = module({"uid": torch.arange(40)})
    module.double()
    with pytest.raises(RuntimeError, match=r"field 'uid': its table changed"):
        out.sum().backward()


def _edit_in_place(ids: torch.Tensor) -> None:
    ids[0] = 9  # the same storage, other rows: the gradient would silently go to row 9


def _free_ids(ids: torch.Tensor) -> None:
    ids.untyped_storage().resize_(0)


def _swap_ids(ids: torch.Tensor) -> None:
    ids.set_(torch.tensor([9, 9, 9, 9, 9]))


ID_CHANGES: dict[str, Callable[[torch.Tensor], None]] = {
    "edited in place": _edit_in_place,
    "storage freed": _free_ids,
    "storage swapped": _swap_ids,
}


@pytest.mark.parametrize("optimizer", [None, *OPTIMIZERS], ids=["grad", "adagrad", "adam"])
@pytest.mark.parametrize("change", list(ID_CHANGES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_changed_before_backward_are_refused(backend: str, change: str, optimizer: FusedOptimizer | None) -> None:
    w, ids, out = _lookup(backend, optimizer)
    before = w.detach().clone()
    ID_CHANGES[change](ids)
    # The reference without a fused optimizer is torch's F.embedding, which raises torch's own
    # error (its saved-tensor version check, or a freed storage).
    match = None if backend == "reference" and optimizer is None else (
        r"field 'history': its indices were modified in place or replaced after forward"
    )
    with pytest.raises(RuntimeError, match=match):
        out.sum().backward()
    assert torch.equal(w.detach(), before)  # refused before any row was written
    assert w.grad is None


def _torch_step(w: torch.Tensor, state: dict[str, torch.Tensor], fields: list[tuple[torch.Tensor, torch.Tensor | None]],
                grad_out: torch.Tensor, optimizer: FusedOptimizer) -> None:
    """The oracle: torch's gradient of one table used for every field, summed over the fields
    by autograd, then one reference update of the rows seen."""
    table = w.detach().clone().requires_grad_()
    outs = [
        F.embedding(ids, table) if off is None else F.embedding_bag(ids, table, off, mode="sum", include_last_offset=True)
        for ids, off in fields
    ]
    (torch.cat(outs, dim=1) * grad_out).sum().backward()
    assert table.grad is not None
    rows = torch.unique(torch.cat([ids for ids, _ in fields]))
    sparse_update_(w.data, state, rows, table.grad[rows], optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["adagrad", "adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_table_shared_by_fields_updates_each_row_once(backend: str, optimizer: FusedOptimizer) -> None:
    # A target-item field and a history bag on one table, plus a table of its own. Before the
    # fix the fast path ran the two fields' updates as two racing tasks (off by up to 0.14), and
    # the reference applied two updates per row.
    torch.manual_seed(3)
    shared = torch.randn(40, 8)
    own = torch.randn(7, 8)
    batch = 64
    w_op, own_op = shared.clone().requires_grad_(), own.clone().requires_grad_()
    s_op, own_s_op = optimizer.init_state(w_op), optimizer.init_state(own_op)
    w_ref, own_ref = shared.clone(), own.clone()
    s_ref, own_s_ref = optimizer.init_state(w_ref), optimizer.init_state(own_ref)
    for _ in range(3):
        item = torch.randint(0, 40, (batch,))
        hist = torch.randint(0, 40, (batch * 5,))
        hist_off = torch.arange(0, batch * 5 + 1, 5)
        other = torch.randint(0, 7, (batch,))
        grad_out = torch.randn(batch, 24)
        out = embedding_collection(
            [w_op, own_op, w_op], [item, other, hist], [None, None, hist_off],
            [Pooling.NONE, Pooling.NONE, Pooling.SUM], optimizer=optimizer,
            optimizer_states=[s_op, own_s_op, s_op], backend=backend,
        )
        (out * grad_out).sum().backward()
        _torch_step(w_ref, s_ref, [(item, None), (hist, hist_off)], torch.cat([grad_out[:, :8], grad_out[:, 16:]], 1), optimizer)
        _torch_step(own_ref, own_s_ref, [(other, None)], grad_out[:, 8:16], optimizer)
    torch.testing.assert_close(w_op.detach(), w_ref, rtol=TOL.rtol, atol=TOL.atol)
    torch.testing.assert_close(own_op.detach(), own_ref, rtol=TOL.rtol, atol=TOL.atol)
    for key in s_ref:
        torch.testing.assert_close(s_op[key], s_ref[key], rtol=TOL.rtol, atol=TOL.atol)


@needs_ext
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["adagrad", "adam"])
def test_shared_table_update_is_deterministic_across_threads(optimizer: FusedOptimizer, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    ids = [torch.randint(0, 300, (40_000,)) for _ in range(3)]
    results = []
    for threads in (1, 2, 4):
        # Lookups per thread lowered so that every field runs as its own task.
        monkeypatch.setattr(ops_embedding, "LOOKUPS_PER_THREAD", 1)
        torch.manual_seed(5)
        w = torch.randn(300, 16, requires_grad=True)
        st = optimizer.init_state(w)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = embedding_collection([w, w, w], ids, [None] * 3, [Pooling.NONE] * 3, optimizer=optimizer,
                                       optimizer_states=[st] * 3, backend="fast")
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        finally:
            torch.set_num_threads(old)
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_tables_or_states_are_refused(backend: str) -> None:
    optimizer = RowwiseAdagrad()
    base = torch.randn(20, 4)
    w1, w2 = base[:12].requires_grad_(), base[8:].requires_grad_()  # two views sharing rows 8..11
    ids = [torch.tensor([1]), torch.tensor([1])]
    out = embedding_collection([w1, w2], ids, [None, None], [Pooling.NONE] * 2, names=["a", "b"], backend=backend,
                               optimizer=optimizer, optimizer_states=[optimizer.init_state(w1), optimizer.init_state(w2)])
    with pytest.raises(ValueError, match=r"field 'a' and field 'b': their tables or optimizer states overlap"):
        out.sum().backward()
    w = torch.randn(5, 4, requires_grad=True)
    out = embedding_collection([w, w], ids, [None, None], [Pooling.NONE] * 2, names=["a", "b"], backend=backend,
                               optimizer=optimizer, optimizer_states=[optimizer.init_state(w), optimizer.init_state(w)])
    with pytest.raises(ValueError, match=r"field 'a' and field 'b' share a table but not its optimizer state"):
        out.sum().backward()
    v = torch.randn(5, 4, requires_grad=True)
    state = optimizer.init_state(w)
    out = embedding_collection([w, v], ids, [None, None], [Pooling.NONE] * 2, names=["a", "b"], backend=backend,
                               optimizer=optimizer, optimizer_states=[state, state])
    with pytest.raises(ValueError, match=r"field 'a' and field 'b': their tables or optimizer states overlap"):
        out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_offsets_say_so(backend: str) -> None:
    with pytest.raises(ValueError, match=r"field 'tags': offsets must have B \+ 1 >= 1 entries, got 0"):
        embedding_collection([torch.randn(5, 4)], [torch.tensor([1])], [torch.tensor([], dtype=torch.int64)],
                             [Pooling.SUM], names=["tags"], backend=backend)


@needs_ext
@pytest.mark.parametrize("shape", [(0, 4), (5, 0)])
def test_auto_routes_empty_tables_to_the_reference(shape: tuple[int, int]) -> None:
    table = torch.randn(*shape, requires_grad=True)
    ids = torch.zeros(0, dtype=torch.int64)
    out = embedding_collection([table], [ids], [None], [Pooling.NONE], backend="auto")
    assert out.shape == (0, shape[1])
    out.sum().backward()
    with pytest.raises(BackendUnavailableError, match=r"needs tables of"):
        embedding_collection([table], [ids], [None], [Pooling.NONE], backend="fast")


@needs_ext
def test_fork_while_another_thread_is_in_the_engine() -> None:
    # A thread keeps the pool busy (two threads: the caller and one worker) while the main thread
    # forks; each child runs the engine on two threads and must finish. Before the pool was
    # fork-safe, a child forked inside a parallel_for inherited its locked mutex and hung.
    native = _ext.native()
    torch.manual_seed(6)
    w = torch.randn(1000, 16)
    ids = torch.randint(0, 1000, (200_000,))
    call = ops_embedding._NativeCall([w], [ids], [None], [Pooling.NONE], None, None, None)
    busy_out = torch.empty(call.batch, 16)
    small = ops_embedding._NativeCall([w], [ids[:8192]], [None], [Pooling.NONE], None, None, None)
    expected = w[ids[:8192]]
    child_out = torch.empty(8192, 16).share_memory_()  # the parent checks what each child wrote
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            native.embedding_forward(call.pointers, call.meta, call.names, call.batch, busy_out, 2)

    thread = threading.Thread(target=hammer)
    thread.start()
    hung = 0
    try:
        for _ in range(15):
            time.sleep(0.003)
            child_out.zero_()
            pid = os.fork()
            if pid == 0:  # the child: only the engine on two threads (torch's own OpenMP pool
                # is not fork-safe, so no torch compute here)
                code = 1
                try:
                    native.embedding_forward(small.pointers, small.meta, small.names, small.batch, child_out, 2)
                    code = 0
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 10.0
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0
                    assert torch.equal(child_out, expected)
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.005)
            if hung:
                break
    finally:
        stop.set()
        thread.join()
    assert hung == 0, "a child forked while the engine ran hung in its first parallel_for"
