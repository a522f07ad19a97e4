"""``EmbeddingCollection.from_torch`` and ``convert``: every torch option reproduced or refused.

One check (``moefast.nn._torch_embedding``) decides for both, so they cannot drift; the last
test fails when torch grows a constructor option this file has not decided on.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import moefast
from moefast.nn import EmbeddingCollection
from moefast.ops.embedding import LazyAdam
from moefast.testing import tolerance

TOL = tolerance(torch.float32)


class _Doubled(nn.Embedding):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(input)


# (module, option named in the error, error type): refused by both entry points.
REFUSED = [
    (lambda: nn.Embedding(10, 4, max_norm=1.0), "max_norm", ValueError),
    (lambda: nn.Embedding(10, 4, max_norm=0.0), "max_norm=0.0", ValueError),  # 0.0 == False, still a norm
    (lambda: nn.EmbeddingBag(10, 4, max_norm=1.0, norm_type=1.0, padding_idx=0), "max_norm", ValueError),
    (lambda: nn.Embedding(10, 4, scale_grad_by_freq=True), "scale_grad_by_freq", ValueError),
    (lambda: nn.EmbeddingBag(10, 4, scale_grad_by_freq=True, padding_idx=0), "scale_grad_by_freq", ValueError),
    (lambda: nn.EmbeddingBag(10, 4, include_last_offset=True, padding_idx=0), "include_last_offset", ValueError),
    (lambda: nn.EmbeddingBag(10, 4, mode="max", padding_idx=0), "mode 'max'", ValueError),
    (lambda: nn.Embedding(10, 4, sparse=True), "sparse=True", ValueError),
    (lambda: nn.Embedding(10, 4, dtype=torch.float64), "float32", TypeError),
    (lambda: nn.Embedding.from_pretrained(torch.ones(5, 3, dtype=torch.float16)), "float32", TypeError),
    (lambda: _Doubled(10, 4), "overrides forward", ValueError),
]


@pytest.mark.parametrize(("make", "option", "error"), REFUSED)
def test_both_entry_points_refuse_naming_module_and_option(make: object, option: str, error: type) -> None:
    module = make()  # type: ignore[operator]
    with pytest.raises(error, match=rf"'field'.*{option}|{option}.*'field'"):
        EmbeddingCollection.from_torch({"field": module})
    model = nn.Sequential()
    model.add_module("layer", module)
    with pytest.raises(error, match=rf"layer.*{option}"):
        moefast.convert(model)
    assert model.layer is module  # nothing half-converted


@pytest.mark.parametrize(("module", "match"), [
    (nn.Embedding(10, 4, padding_idx=3), r"'f'.*padding_idx=3.*no padding id"),
    (nn.Embedding(10, 4, padding_idx=0), r"'f'.*padding_idx=0.*no padding id"),
    (nn.EmbeddingBag(10, 4, mode="sum"), r"'f'.*padding_idx=None.*skip id 0"),
    (nn.EmbeddingBag(10, 4, mode="mean", padding_idx=2), r"'f'.*padding_idx=2.*skip id 0"),
])
def test_from_torch_refuses_padding_the_contract_cannot_hold(module: nn.Module, match: str) -> None:
    # Each of these would compute something else on the collection's input: torch pools id 0
    # where the collection skips it, or skips (no gradient) an id the collection pools.
    with pytest.raises(ValueError, match=match):
        EmbeddingCollection.from_torch({"f": module})


def _torch_and_collection(**kwargs: object) -> tuple[dict[str, nn.Module], EmbeddingCollection]:
    torch.manual_seed(0)
    modules: dict[str, nn.Module] = {
        "uid": nn.Embedding(30, 4, norm_type=1.0),  # norm_type acts only with max_norm
        "tags": nn.EmbeddingBag(12, 4, mode="mean", padding_idx=0, norm_type=3.0),
        "hist": nn.EmbeddingBag.from_pretrained(torch.randn(25, 8), freeze=True, mode="sum", padding_idx=0),
    }
    return modules, EmbeddingCollection.from_torch(modules, **kwargs)  # type: ignore[arg-type]


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {"uid": torch.randint(0, 30, (9,), generator=g), "tags": torch.randint(0, 12, (9, 3), generator=g),
             "hist": torch.randint(0, 25, (9, 4), generator=g)}
    batch["tags"][:4, 1:] = 0
    batch["hist"][0] = 0
    return batch


def assert_same_as_torch(emb: EmbeddingCollection, modules: dict[str, nn.Module],
                         batch: dict[str, torch.Tensor]) -> None:
    """``emb`` gives what the torch ``modules`` give on ``batch``: output and every table's
    gradient (none for a frozen one)."""
    expected = torch.cat([m(batch[n]) for n, m in modules.items()], dim=1)
    out = emb(batch)
    torch.testing.assert_close(out, expected, rtol=TOL.rtol, atol=TOL.atol)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for name, module in modules.items():
        if module.weight.requires_grad:
            torch.testing.assert_close(emb.tables[name].grad, module.weight.grad, rtol=TOL.rtol, atol=TOL.atol)
        else:
            assert emb.tables[name].grad is None


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_accepted_options_compute_what_torch_computes(backend: str) -> None:
    if backend == "fast" and not moefast._ext.available():
        pytest.skip("moefast._C not built")
    modules, emb = _torch_and_collection(backend=backend)
    # A frozen table (from_pretrained(freeze=True)) stays frozen; the others train.
    assert [emb.tables[n].requires_grad for n in modules] == [True, True, False]
    assert_same_as_torch(emb, modules, _batch())


def test_frozen_table_is_not_updated_by_a_fused_optimizer() -> None:
    _, emb = _torch_and_collection(optimizer=LazyAdam(lr=0.1))
    before = {n: t.detach().clone() for n, t in emb.tables.items()}
    emb(_batch()).square().sum().backward()
    assert torch.equal(emb.tables["hist"], before["hist"])
    assert not torch.equal(emb.tables["uid"], before["uid"])


def test_sparse_modules_give_the_same_sparse_gradient() -> None:
    torch.manual_seed(0)
    module = nn.EmbeddingBag(12, 4, mode="sum", padding_idx=0, sparse=True)
    with pytest.raises(ValueError, match=r"'f'.*sparse=True.*gives dense gradients"):
        EmbeddingCollection.from_torch({"f": module})
    emb = EmbeddingCollection.from_torch({"f": module}, sparse=True)
    ids = _batch()["tags"]
    out, expected = emb({"f": ids}), module(ids)
    out.sum().backward()
    expected.sum().backward()
    got = emb.tables["f"].grad
    assert got is not None and got.is_sparse
    want = module.weight.grad
    assert want is not None
    torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=TOL.rtol, atol=TOL.atol)
    # A dense module asked for sparse gradients is the mismatch the other way round.
    with pytest.raises(ValueError, match=r"'g'.*sparse=False.*sparse gradients"):
        EmbeddingCollection.from_torch({"g": nn.Embedding(3, 2)}, sparse=True)
    # Under a fused optimizer there is no gradient, so the module's layout does not matter.
    EmbeddingCollection.from_torch({"f": module}, optimizer=LazyAdam(lr=0.1))


@pytest.mark.parametrize("backend", ["reference", "fast", "auto"])
def test_converted_bag_refuses_ids_without_bags(backend: str) -> None:
    # torch.nn.EmbeddingBag returns [0, D] for 3 ids and no offsets, dropping the ids silently.
    if backend == "fast" and not moefast._ext.available():
        pytest.skip("moefast._C not built")
    bag = moefast.nn.convert.EmbeddingBag.from_torch(nn.EmbeddingBag(10, 4, mode="sum"), backend=backend)
    with pytest.raises(ValueError, match="offsets is empty \\(0 bags\\) but input holds 3 ids"):
        bag(torch.tensor([1, 2, 3]), torch.zeros(0, dtype=torch.int64))
    assert bag(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)).shape == (0, 4)


def test_modules_on_several_devices_are_refused() -> None:
    with pytest.raises(ValueError, match="several devices"):
        EmbeddingCollection.from_torch([nn.Embedding(3, 2), nn.Embedding(3, 2, device="meta")])


# Every constructor option of torch's two modules, and where it is decided. A torch release
# that adds one fails here until someone decides whether moefast reproduces it.
DECIDED = {
    "num_embeddings", "embedding_dim", "device", "dtype",  # shape, placement: carried over
    "_weight", "_freeze",  # the weight (float32 only) and requires_grad: carried over
    "padding_idx",  # check_collection_padding / check_padding_row
    "max_norm", "scale_grad_by_freq", "include_last_offset", "mode", "sparse",  # check_torch_embedding
    "norm_type",  # acts only with max_norm, which is refused
}


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_every_torch_option_is_decided(cls: type[nn.Module]) -> None:
    options = set(inspect.signature(cls).parameters)
    assert options <= DECIDED, f"undecided {cls.__name__} options: {sorted(options - DECIDED)}"
