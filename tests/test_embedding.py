"""Table-batched embedding lookup: parity with torch, gradients, fused optimizers, the module.

Every test runs on both backends: the plain-PyTorch reference and the C++ engine. The oracle
is ``torch.nn.functional.embedding_bag`` / ``embedding`` (independent of both), or the
reference optimizers of ``moefast.reference.embedding_optim`` fed with torch's own gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from test_embedding_from_torch import assert_same_as_torch
from torch import nn

from moefast import _ext
from moefast.config import FeatureSpec, Pooling
from moefast.nn import EmbeddingCollection
from moefast.ops import embedding as ops_embedding
from moefast.ops import embedding_collection
from moefast.reference.embedding_optim import (
    FusedOptimizer,
    LazyAdam,
    RowwiseAdagrad,
    sparse_update_,
)
from moefast.testing import tolerance

FAST = pytest.param(
    "fast", marks=pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")
)
BACKENDS = ["reference", FAST]
TOL = tolerance(torch.float32)


@dataclass
class Field:
    """One field of a test batch, plus how torch computes it (the oracle)."""

    weight: torch.Tensor  # float32 [V, D]
    indices: torch.Tensor  # [N]
    offsets: torch.Tensor | None  # [B + 1]
    pooling: Pooling
    psw: torch.Tensor | None = None
    padding_idx: int | None = None

    def torch_forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.offsets is None:
            out = F.embedding(self.indices.long(), weight, padding_idx=self.padding_idx)
            if self.padding_idx is not None:  # F.embedding returns the row; the op skips it
                out = out * (self.indices != self.padding_idx)[:, None]
            return out if self.psw is None else out * self.psw[:, None]
        return F.embedding_bag(
            self.indices.long(), weight, self.offsets.long(), mode=self.pooling.value,
            per_sample_weights=self.psw, include_last_offset=True, padding_idx=self.padding_idx,
        )


def make_fields(batch: int, seed: int = 0, index_dtype: torch.dtype = torch.int64) -> list[Field]:
    """A mix covering every case: gather, int32 ids, sum with weights, mean with padding,
    empty bags, duplicate ids (small vocabularies) and dim 1."""
    g = torch.Generator().manual_seed(seed)

    def bags(vocab: int, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
        offsets = torch.zeros(batch + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        ids = torch.randint(0, vocab, (int(offsets[-1]),), generator=g)
        return ids.to(dtype), offsets.to(dtype)

    fields = [
        Field(torch.randn(50, 8, generator=g), torch.randint(0, 50, (batch,), generator=g).to(index_dtype), None, Pooling.NONE),
        Field(torch.randn(7, 3, generator=g), torch.randint(0, 7, (batch,), generator=g).to(torch.int32), None, Pooling.NONE),
    ]
    ids, off = bags(11, 5, index_dtype)
    fields.append(Field(torch.randn(11, 16, generator=g), ids, off, Pooling.SUM, psw=torch.rand(ids.shape[0], generator=g)))
    ids, off = bags(9, 4, index_dtype)
    fields.append(Field(torch.randn(9, 5, generator=g), ids, off, Pooling.MEAN, padding_idx=0))
    ids, off = bags(1000, 3, torch.int32)
    fields.append(Field(torch.randn(1000, 64, generator=g), ids, off, Pooling.SUM))
    # Dim 1 (first-order weights) has its own scalar kernel: a gather and a weighted bag.
    fields.append(Field(torch.randn(30, 1, generator=g), torch.randint(0, 30, (batch,), generator=g).to(index_dtype), None, Pooling.NONE))
    ids, off = bags(12, 4, index_dtype)
    fields.append(Field(torch.randn(12, 1, generator=g), ids, off, Pooling.SUM, psw=torch.rand(ids.shape[0], generator=g)))
    return fields


def run_op(fields: Sequence[Field], weights: Sequence[torch.Tensor], backend: str, **kw: object) -> torch.Tensor:
    return embedding_collection(
        list(weights),
        [f.indices for f in fields],
        [f.offsets for f in fields],
        [f.pooling for f in fields],
        [f.psw for f in fields],
        padding_idx=[f.padding_idx for f in fields],
        backend=backend,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("batch", [1, 37, 256])
def test_forward_and_dense_backward_match_torch(backend: str, index_dtype: torch.dtype, batch: int) -> None:
    fields = make_fields(batch, seed=batch, index_dtype=index_dtype)
    ours = [f.weight.clone().requires_grad_() for f in fields]
    theirs = [f.weight.clone().requires_grad_() for f in fields]
    out = run_op(fields, ours, backend)
    expected = torch.cat([f.torch_forward(w) for f, w in zip(fields, theirs, strict=True)], dim=1)
    torch.testing.assert_close(out, expected, rtol=TOL.rtol, atol=TOL.atol)
    grad_out = torch.randn_like(expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    for w_ours, w_theirs in zip(ours, theirs, strict=True):
        assert w_ours.grad is not None and not w_ours.grad.is_sparse
        torch.testing.assert_close(w_ours.grad, w_theirs.grad, rtol=TOL.rtol, atol=TOL.atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_is_coalescable_and_equals_dense(backend: str) -> None:
    fields = make_fields(64, seed=3)
    ours = [f.weight.clone().requires_grad_() for f in fields]
    theirs = [f.weight.clone().requires_grad_() for f in fields]
    grad_out = torch.randn(64, sum(f.weight.shape[1] for f in fields))
    run_op(fields, ours, backend, sparse=True).backward(grad_out)
    torch.cat([f.torch_forward(w) for f, w in zip(fields, theirs, strict=True)], 1).backward(grad_out)
    for w_ours, w_theirs in zip(ours, theirs, strict=True):
        assert w_ours.grad is not None and w_ours.grad.is_sparse
        torch.testing.assert_close(w_ours.grad.coalesce().to_dense(), w_theirs.grad, rtol=TOL.rtol, atol=TOL.atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_bags(backend: str) -> None:
    w = torch.randn(10, 4, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int64)
    out = embedding_collection(
        [w, w.detach().clone()], [empty, empty], [None, torch.zeros(1, dtype=torch.int64)],
        [Pooling.NONE, Pooling.SUM], backend=backend,
    )
    assert out.shape == (0, 8)
    out.sum().backward()
    assert w.grad is not None and not w.grad.any()
    # Three samples whose bags are all empty: zero vectors for sum and mean.
    out = embedding_collection(
        [w.detach(), w.detach()], [empty, empty], [torch.zeros(4, dtype=torch.int64)] * 2,
        [Pooling.SUM, Pooling.MEAN], backend=backend,
    )
    assert out.shape == (3, 8) and not out.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [RowwiseAdagrad(lr=0.1), LazyAdam(lr=0.05)], ids=["adagrad", "lazy_adam"])
def test_fused_optimizer_matches_reference_update(backend: str, config: FusedOptimizer) -> None:
    """Several steps over batches with repeated ids: the fused step equals torch's summed sparse
    gradient fed to the reference update."""
    fields = make_fields(48, seed=11)
    ours = [f.weight.clone().requires_grad_() for f in fields]
    states = [config.init_state(w) for w in ours]
    theirs = [f.weight.clone().requires_grad_() for f in fields]
    their_states = [config.init_state(w) for w in theirs]
    for step in range(4):
        batch_fields = make_fields(48, seed=100 + step)
        grad_out = torch.randn(48, sum(f.weight.shape[1] for f in fields))
        run_op(batch_fields, ours, backend, optimizer=config, optimizer_states=states).backward(grad_out)
        expected = torch.cat([f.torch_forward(w) for f, w in zip(batch_fields, theirs, strict=True)], 1)
        grads = torch.autograd.grad(expected, theirs, grad_out)
        for t, (w, g) in enumerate(zip(theirs, grads, strict=True)):
            rows = torch.nonzero(
                torch.zeros(w.shape[0], dtype=torch.bool).index_fill_(0, _seen(batch_fields[t]), True)
            ).flatten()
            sparse_update_(w.data, their_states[t], rows, g[rows], config)
    for t, (w_ours, w_theirs) in enumerate(zip(ours, theirs, strict=True)):
        assert w_ours.grad is None
        torch.testing.assert_close(w_ours.detach(), w_theirs.detach(), rtol=TOL.rtol, atol=TOL.atol)
        for slot, value in states[t].items():
            torch.testing.assert_close(value, their_states[t][slot], rtol=TOL.rtol, atol=TOL.atol)


def _seen(field: Field) -> torch.Tensor:
    """int64 ids a batch looks up (padding excluded): the rows lazy optimizers touch."""
    ids = field.indices.long()
    return ids[ids != field.padding_idx] if field.padding_idx is not None else ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_table_is_not_updated(backend: str) -> None:
    fields = make_fields(16, seed=5)
    weights = [f.weight.clone().requires_grad_(t != 0) for t, f in enumerate(fields)]
    config = RowwiseAdagrad(lr=0.5)
    states = [config.init_state(w) for w in weights]
    run_op(fields, weights, backend, optimizer=config, optimizer_states=states).sum().backward()
    assert torch.equal(weights[0], fields[0].weight)
    assert not torch.equal(weights[1], fields[1].weight)


# ------------------------------------------------------------------------------------------
# The module


SPECS = (
    FeatureSpec("uid", 30, 4),
    FeatureSpec("item", 20, 8),
    FeatureSpec("tags", 12, 4, Pooling.MEAN),
    FeatureSpec("hist", 25, 8, Pooling.SUM),
)


def _batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {s.name: torch.randint(0, s.vocab_size, (n,) + ((3,) if s.multi_valued else ()), generator=g) for s in SPECS}
    out["tags"][: n // 2, 1:] = 0  # right padding
    out["hist"][0] = 0  # an all-padding bag
    out["domain"] = torch.zeros(n, dtype=torch.int64)  # not a feature: ignored
    return out


def test_module_layout_and_init() -> None:
    torch.manual_seed(0)
    emb = EmbeddingCollection(SPECS)
    assert list(emb.state_dict()) == [f"tables.{s.name}" for s in SPECS]
    assert emb.output_dims == [4, 8, 4, 8] and emb.features == SPECS
    torch.manual_seed(0)
    torch_tables = [nn.Embedding(s.vocab_size, s.dim) for s in SPECS]
    for spec, table in zip(SPECS, torch_tables, strict=True):
        assert torch.equal(emb.tables[spec.name], table.weight)
    small = EmbeddingCollection(SPECS, init_std=1e-4)
    assert 0 < float(small.tables["uid"].detach().std()) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_torch_modules(backend: str) -> None:
    torch_modules = {
        "uid": nn.Embedding(30, 4),
        "item": nn.Embedding(20, 8),
        "tags": nn.EmbeddingBag(12, 4, mode="mean", padding_idx=0),
        "hist": nn.EmbeddingBag(25, 8, mode="sum", padding_idx=0),
    }
    emb = EmbeddingCollection.from_torch(torch_modules, backend=backend)
    assert emb.features == SPECS
    assert_same_as_torch(emb, torch_modules, _batch(10))


def test_module_backends_share_state_and_results() -> None:
    config = LazyAdam(lr=0.01)
    torch.manual_seed(1)
    ref = EmbeddingCollection(SPECS, backend="reference", optimizer=config)
    backends = ["fast"] if _ext.available() else []
    for backend in backends:
        fast = EmbeddingCollection(SPECS, backend=backend, optimizer=config)
        fast.load_state_dict(ref.state_dict())
        assert list(fast.state_dict()) == list(ref.state_dict())
        for step in range(3):
            batch = _batch(16, seed=step)
            ref(batch).square().sum().backward()
            fast(batch).square().sum().backward()
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(fast.state_dict()[key], value, rtol=TOL.rtol, atol=TOL.atol, msg=key)


@pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")
def test_fast_results_do_not_depend_on_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row's gradient is summed by one task in a fixed order: bitwise equal results."""
    monkeypatch.setattr(ops_embedding, "LOOKUPS_PER_THREAD", 1)  # small batches use every thread
    fields = make_fields(512, seed=7)
    grad_out = torch.randn(512, sum(f.weight.shape[1] for f in fields))
    config = LazyAdam(lr=0.1)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            dense = [f.weight.clone().requires_grad_() for f in fields]
            out = run_op(fields, dense, "fast")
            out.backward(grad_out)
            fused = [f.weight.clone().requires_grad_() for f in fields]
            states = [config.init_state(w) for w in fused]
            for _ in range(2):
                run_op(fields, fused, "fast", optimizer=config, optimizer_states=states).backward(grad_out)
            results.append([out.detach(), *(w.grad for w in dense), *(w.detach() for w in fused)])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert a is not None and b is not None and torch.equal(a, b)


@pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")
def test_small_calls_run_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second thread is woken only for at least LOOKUPS_PER_THREAD lookups per thread."""
    asked: list[int] = []
    real = _ext.native()

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def embedding_forward(self, *args: object) -> None:
            asked.append(int(args[-1]))  # type: ignore[call-overload]
            real.embedding_forward(*args)

    monkeypatch.setattr(_ext, "native", lambda: Spy())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        weight = torch.randn(100, 4)
        for rows in (100, 2 * ops_embedding.LOOKUPS_PER_THREAD):
            ids = torch.randint(0, 100, (rows,))
            embedding_collection([weight], [ids], [None], [Pooling.NONE], backend="fast")
    finally:
        torch.set_num_threads(before)
    assert asked == [1, 2]


# The SIMD clones (AVX-512, AVX2, baseline) are compared bit for bit in test_embedding_half.py.


def test_embed_together_matches_separate_lookups_and_splits_calls_only_when_it_must(
    lookup_calls: list[int],
) -> None:
    """One op call for collections that share backend, sparse mode and fused optimizer (their
    outputs equal separate lookups, gradients too); one call each otherwise."""
    from moefast.nn import embedding as nn_embedding

    specs = [FeatureSpec("a", 30, 4), FeatureSpec("b", 20, 4, Pooling.SUM)]
    features = {"a": torch.randint(0, 30, (16,)), "b": torch.randint(0, 20, (16, 3))}
    calls = lookup_calls
    torch.manual_seed(0)
    first = EmbeddingCollection(specs, init_std=0.1)
    second = EmbeddingCollection([FeatureSpec("a", 30, 1), FeatureSpec("b", 20, 1, Pooling.SUM)], init_std=0.1)
    joint = nn_embedding.embed_together([first, second], features)
    assert calls == [4]
    separate = [first(features), second(features)]
    for a, b in zip(joint, separate, strict=True):
        assert torch.equal(a, b)
    (joint[0].sum() + joint[1].square().sum()).backward()
    grads = [t.grad.clone() for c in (first, second) for t in c.tables.values()]
    for c in (first, second):
        c.zero_grad()
    (first(features).sum() + second(features).square().sum()).backward()
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, [t for c in (first, second) for t in c.tables.values()], strict=True))
    calls.clear()
    second.set_optimizer(LazyAdam(lr=0.1))  # different update rules: two calls
    nn_embedding.embed_together([first, second], features)
    assert calls == [2, 2]
