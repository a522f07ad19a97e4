"""Bad input gets the exact exception on both backends; random shapes (hypothesis) match a loop.

The loop oracle sums rows bag by bag in float64, written for reading, independent of both
backends and of ``torch.nn.functional.embedding_bag``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moefast import _ext
from moefast.config import FeatureSpec, Pooling
from moefast.nn import EmbeddingCollection
from moefast.ops import embedding_collection
from moefast.ops._backend import BackendUnavailableError
from moefast.testing import tolerance

FAST = pytest.param(
    "fast", marks=pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")
)
BACKENDS = ["reference", FAST]
TOL = tolerance(torch.float32)
I64 = torch.int64


def _args() -> dict[str, Any]:
    """A valid two-field call (a gather and a sum bag) that each bad case breaks in one place."""
    return {
        "weights": [torch.randn(10, 4), torch.randn(6, 3)],
        "indices": [torch.tensor([1, 2, 3]), torch.tensor([0, 5, 5, 1])],
        "offsets": [None, torch.tensor([0, 1, 1, 4])],
        "poolings": [Pooling.NONE, Pooling.SUM],
        "per_sample_weights": None,
        "padding_idx": None,
        "names": ["user", "tags"],
    }


def _set(key: str, index: int | None, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(args: dict[str, Any]) -> None:
        if index is None:
            args[key] = value
        else:
            args[key] = list(args[key])
            args[key][index] = value

    return edit


BAD_INPUTS: list[tuple[str, Callable[[dict[str, Any]], None], type[Exception], str]] = [
    ("id too large", _set("indices", 0, torch.tensor([1, 10, 3])), ValueError, r"field 'user': id 10 outside \[0, 10\)"),
    ("negative id", _set("indices", 1, torch.tensor([0, 5, -1, 1])), ValueError, r"field 'tags': id -1 outside \[0, 6\)"),
    ("negative int32 id", _set("indices", 0, torch.tensor([1, -7, 3], dtype=torch.int32)), ValueError, r"field 'user': id -7"),
    ("float ids", _set("indices", 0, torch.tensor([1.0, 2.0, 3.0])), TypeError, r"field 'user': indices must be"),
    ("2-D ids", _set("indices", 0, torch.tensor([[1, 2, 3]])), TypeError, r"field 'user': indices must have 1"),
    ("strided ids", _set("indices", 0, torch.arange(6)[::2]), TypeError, r"field 'user': indices must be contiguous"),
    ("ids on another device", _set("indices", 0, torch.zeros(3, dtype=I64, device="meta")), TypeError, r"field 'user': indices is on meta"),
    ("float64 table", _set("weights", 0, torch.randn(10, 4, dtype=torch.float64)), TypeError, r"field 'user': table must be a float32"),
    ("strided table", _set("weights", 0, torch.randn(4, 10).t()), TypeError, r"field 'user': table must be contiguous"),
    ("offsets not from 0", _set("offsets", 1, torch.tensor([1, 1, 1, 4])), ValueError, r"field 'tags': offsets must start at 0"),
    ("offsets short of N", _set("offsets", 1, torch.tensor([0, 1, 1, 3])), ValueError, r"field 'tags': offsets must start at 0"),
    ("offsets decreasing", _set("offsets", 1, torch.tensor([0, 3, 1, 4])), ValueError, r"field 'tags': offsets must start at 0, never decrease"),
    ("offsets for another batch", _set("offsets", 1, torch.tensor([0, 4])), ValueError, r"field 'tags' has 1 samples, field 'user' has 3"),
    ("int32 offsets, int64 ids", _set("offsets", 1, torch.tensor([0, 1, 1, 4], dtype=torch.int32)), TypeError, r"field 'tags': offsets must be torch.int64"),
    ("bag without offsets", _set("offsets", 1, None), ValueError, r"field 'tags': a pooled field"),
    ("gather with offsets", _set("offsets", 0, torch.tensor([0, 1, 2, 3])), ValueError, r"field 'user': a single-valued field"),
    ("weights with mean", lambda a: (a.update(per_sample_weights=[None, torch.ones(4)]), a["poolings"].__setitem__(1, Pooling.MEAN)), ValueError, r"field 'tags': per_sample_weights need sum"),
    ("weights too short", _set("per_sample_weights", None, [None, torch.ones(3)]), ValueError, r"field 'tags': per_sample_weights has 3 entries for 4"),
    ("float64 weights", _set("per_sample_weights", None, [None, torch.ones(4, dtype=torch.float64)]), TypeError, r"field 'tags': per_sample_weights must be torch.float32"),
    ("padding id out of range", _set("padding_idx", None, [None, 6]), ValueError, r"field 'tags': padding_idx 6 outside \[0, 6\)"),
    ("list lengths differ", _set("names", None, ["user"]), ValueError, r"names has 1 entries for 2 tables"),
    ("pooling not a Pooling", _set("poolings", 1, "sum"), TypeError, r"field 'tags': pooling must be a Pooling"),
    ("no fields", lambda a: a.update(weights=[], indices=[], offsets=[], poolings=[], names=[]), ValueError, r"at least one field"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("case", "edit", "error", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(
    backend: str, case: str, edit: Callable[[dict[str, Any]], None], error: type[Exception], match: str
) -> None:
    args = _args()
    embedding_collection(**args, backend=backend)  # the unedited call is valid
    edit(args)
    with pytest.raises(error, match=match):
        embedding_collection(**args, backend=backend)


@pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")
def test_explicit_fast_on_another_device_says_why() -> None:
    args = _args()
    args["weights"] = [w.to("meta") for w in args["weights"]]
    with pytest.raises(BackendUnavailableError, match="CPU tensors only"):
        embedding_collection(**args, backend="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_input_errors(backend: str) -> None:
    emb = EmbeddingCollection([FeatureSpec("uid", 5, 2), FeatureSpec("tags", 5, 2, Pooling.SUM)], backend=backend)
    good = {"uid": torch.tensor([1, 2]), "tags": torch.tensor([[1, 0], [2, 3]])}
    assert emb(good).shape == (2, 4)
    with pytest.raises(ValueError, match="missing feature 'tags'"):
        emb({"uid": good["uid"]})
    with pytest.raises(ValueError, match=r"multi-valued feature 'tags' must be \[B, L\]"):
        emb({**good, "tags": torch.tensor([1, 2])})
    with pytest.raises(ValueError, match=r"field 'tags': id 5 outside \[0, 5\)"):
        emb({**good, "tags": torch.tensor([[1, 5], [2, 3]])})
    with pytest.raises(TypeError, match="feature 'tags' must be contiguous"):
        emb({**good, "tags": torch.tensor([[1, 2], [0, 3]]).t()})


# ------------------------------------------------------------------------------------------
# Random shapes


def _loop_oracle(
    weight: torch.Tensor, ids: list[list[int]], weights: list[list[float]] | None, pooling: Pooling, pad: int | None
) -> torch.Tensor:
    """float64 [B, D], differentiable w.r.t. ``weight``: one bag at a time."""
    rows = []
    for b, bag in enumerate(ids):
        acc = weight[:0].double().sum(0)  # zeros [D], in the graph even for an empty bag
        count = 0
        for k, i in enumerate(bag):
            if i == pad:
                continue
            scale = weights[b][k] if weights is not None else 1.0
            acc = acc + scale * weight[i].double()
            count += 1
        if pooling is Pooling.MEAN and count:
            acc = acc / count
        rows.append(acc)
    return torch.stack(rows) if rows else weight[:0].double()  # [0, D], still in the graph


@st.composite
def _fields(draw: st.DrawFn) -> tuple[int, list[dict[str, Any]]]:
    batch = draw(st.integers(0, 9))
    fields = []
    for _ in range(draw(st.integers(1, 3))):
        vocab = draw(st.integers(1, 6))  # small vocabularies: duplicate ids in most batches
        pooling = draw(st.sampled_from(list(Pooling)))
        if pooling is Pooling.NONE:
            ids = [[draw(st.integers(0, vocab - 1))] for _ in range(batch)]
        else:
            ids = [draw(st.lists(st.integers(0, vocab - 1), max_size=4)) for _ in range(batch)]
        weighted = pooling is not Pooling.MEAN and draw(st.booleans())
        fields.append({
            "dim": draw(st.sampled_from([1, 3, 4, 16, 17])),  # fixed-width kernels and the generic one
            "vocab": vocab,
            "pooling": pooling,
            "ids": ids,
            "weights": [[draw(st.floats(-2, 2, width=32)) for _ in bag] for bag in ids] if weighted else None,
            "pad": draw(st.sampled_from([None, 0])) if pooling is not Pooling.NONE else None,
            "dtype": draw(st.sampled_from([torch.int32, torch.int64])),
        })
    return batch, fields


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(case=_fields())
def test_random_shapes_match_loop(backend: str, case: tuple[int, list[dict[str, Any]]]) -> None:
    batch, fields = case
    weights = [torch.randn(f["vocab"], f["dim"], requires_grad=True) for f in fields]
    indices, offsets, psw = [], [], []
    for f in fields:
        flat = [i for bag in f["ids"] for i in bag]
        indices.append(torch.tensor(flat, dtype=f["dtype"]))
        lengths = torch.tensor([len(bag) for bag in f["ids"]], dtype=torch.int64)
        off = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(f["dtype"])
        offsets.append(off if f["pooling"] is not Pooling.NONE else None)
        psw.append(torch.tensor([x for bag in f["weights"] for x in bag]) if f["weights"] else None)
        if f["weights"] is not None and not flat:
            psw[-1] = torch.zeros(0)
    out = embedding_collection(
        weights, indices, offsets, [f["pooling"] for f in fields], psw,
        padding_idx=[f["pad"] for f in fields], backend=backend,
    )
    expected = torch.cat(
        [_loop_oracle(w, f["ids"], f["weights"], f["pooling"], f["pad"]) for w, f in zip(weights, fields, strict=True)],
        dim=1,
    )
    assert out.shape == (batch, sum(f["dim"] for f in fields))
    torch.testing.assert_close(out.double(), expected, rtol=TOL.rtol, atol=TOL.atol)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    ours = torch.autograd.grad(out, weights, grad_out.float(), allow_unused=True)
    theirs = torch.autograd.grad(expected, weights, grad_out, allow_unused=True)
    for g_ours, g_theirs, w in zip(ours, theirs, weights, strict=True):
        g_ref = g_theirs if g_theirs is not None else torch.zeros_like(w)
        g_got = g_ours if g_ours is not None else torch.zeros_like(w)
        torch.testing.assert_close(g_got.double(), g_ref.double(), rtol=TOL.rtol, atol=TOL.atol)
