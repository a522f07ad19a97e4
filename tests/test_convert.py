"""``moefast.convert``: layers swapped in place, weights kept, same results as before."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import moefast
from moefast import data, models
from moefast.config import TowerConfig, TowerKind
from moefast.ops._backend import Backend
from moefast.testing import tolerance

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
TOL = tolerance(torch.float32)


def test_docs_convert_example_runs() -> None:
    """docs/architecture.md's ``convert`` example, executed as written."""
    section = ARCHITECTURE.read_text(encoding="utf-8").split("## Drop-in use: `moefast.convert`", 1)
    assert len(section) == 2, "docs/architecture.md lost its convert section"
    blocks = re.findall(r"```python\n(.*?)```", section[1], flags=re.S)
    assert blocks, "the convert section has no python example"
    exec(compile(blocks[0], str(ARCHITECTURE), "exec"), {"__name__": "docs_example"})


class _Nested(nn.Module):
    """Embeddings at several depths and in containers; padding in both kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.fields = nn.ModuleList([nn.Embedding(30, 4), nn.Embedding(20, 3, padding_idx=0)])
        self.bags = nn.ModuleDict({"sum": nn.EmbeddingBag(25, 5, mode="sum"),
                                   "mean": nn.EmbeddingBag(25, 5, mode="mean", padding_idx=0)})
        self.head = nn.Linear(4 + 3 + 5 + 5, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor, flat: torch.Tensor, starts: torch.Tensor,
                bag: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x = torch.cat([
            self.fields[0](a), self.fields[1](b),
            self.bags["sum"](flat, starts, per_sample_weights=weights),  # flat ids with bag starts
            self.bags["mean"](bag),  # [B, L]
        ], dim=1)
        return self.head(x).squeeze(1)


def _inputs(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    a = torch.randint(0, 30, (9,), generator=gen)
    b = torch.randint(0, 20, (9,), generator=gen)
    b[:3] = 0  # padding rows: zero vectors, no gradient
    flat = torch.randint(0, 25, (20,), generator=gen)
    starts = torch.tensor([0, 2, 2, 5, 9, 10, 14, 15, 19])  # bag 1 empty
    bag = torch.randint(0, 25, (9, 4), generator=gen)
    bag[0] = 0  # an all-padding bag: mean of nothing is zero
    weights = torch.rand(20, generator=gen)
    return a, b, flat, starts, bag, weights


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_convert_plain_model_keeps_weights_outputs_and_gradients(backend: str) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _Nested()
    inputs = _inputs(gen)
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    out_before = model(*inputs)
    out_before.sum().backward()
    grads_before = {k: p.grad.clone() for k, p in params_before.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    assert moefast.convert(model, backend=backend) is model
    assert isinstance(model.fields[0], moefast.nn.Embedding)
    assert isinstance(model.bags["mean"], moefast.nn.EmbeddingBag)
    assert isinstance(model.head, nn.Linear)  # no adapter to fuse: left as is
    assert list(model.state_dict()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name], name  # the same tensors: an optimizer keeps working
    out = model(*inputs)
    torch.testing.assert_close(out, out_before, rtol=TOL.rtol, atol=TOL.atol)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads_before[name], rtol=TOL.rtol, atol=TOL.atol, msg=name)


def test_convert_sets_backend_on_moefast_layers() -> None:
    ds = data.load("synthetic", preset="paper", seed=1, rows=500, num_domains=2)
    tower = TowerConfig(kind=TowerKind.MLORA, hidden_units=(16,), ranks=(2,))
    model = models.build("deepfm", ds, "mlora", tower_config=tower, backend="reference")
    model.eval()  # dropout off: the two forwards must see the same function
    batch = ds.train.rows(torch.arange(32))
    before = model(batch.features, batch.domain)
    moefast.convert(model, backend="fast")
    layers = [m for m in model.modules()
              if isinstance(m, moefast.nn.AdapterLinear | moefast.nn.EmbeddingCollection)]
    assert layers and all(m.backend is Backend.FAST for m in layers)
    torch.testing.assert_close(model(batch.features, batch.domain), before, rtol=TOL.rtol, atol=TOL.atol)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Embedding(10, 4, max_norm=1.0), "max_norm"),
        (nn.Embedding(10, 4, sparse=True), "sparse"),
        (nn.EmbeddingBag(10, 4, mode="max"), "mode 'max'"),
        (nn.EmbeddingBag(10, 4, include_last_offset=True), "include_last_offset"),
    ],
)
def test_convert_refuses_what_it_cannot_reproduce(layer: nn.Module, match: str) -> None:
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=match):
        moefast.convert(model)
    assert model[0] is layer  # nothing half-converted


def test_convert_refuses_nonzero_padding_row_and_bad_arguments() -> None:
    emb = nn.Embedding(10, 4, padding_idx=0)
    with torch.no_grad():
        emb.weight[0] = 1.0
    with pytest.raises(ValueError, match="padding row 0"):
        moefast.convert(nn.Sequential(emb))
    with pytest.raises(ValueError, match="unknown backend"):
        moefast.convert(nn.Sequential(nn.Embedding(3, 2)), backend="fastest")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        moefast.convert(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bare embedding"):
        moefast.convert(nn.Embedding(3, 2))
