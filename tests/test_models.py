"""Backbones and towers: forwards equal a hand-written per-sample computation; build()."""

from __future__ import annotations

import pytest
import torch

from moefast import data, models
from moefast.config import FeatureSpec, Pooling, TowerConfig, TowerKind
from moefast.data.dataset import MultiDomainDataset, Split
from moefast.models.alpha import alpha_for
from moefast.nn.tower import Routing, Tower
from moefast.testing import tolerance

D = 3


def tiny_dataset(n: int = 64, *, name: str = "synthetic-tiny", dims: tuple[int, int, int] = (4, 4, 4)) -> MultiDomainDataset:
    """Three fields (one multi-valued), three domains, every split the same random rows."""
    gen = torch.Generator().manual_seed(7)
    specs = (
        FeatureSpec("uid", 50, dims[0]),
        FeatureSpec("item", 30, dims[1]),
        FeatureSpec("tags", 12, dims[2], Pooling.SUM),
    )
    features = {
        "uid": torch.randint(0, 50, (n,), generator=gen),
        "item": torch.randint(0, 30, (n,), generator=gen),
        "tags": torch.randint(0, 12, (n, 3), generator=gen),
    }
    domain = torch.arange(n) % D
    label = (torch.rand(n, generator=gen) < 0.5).float()
    split = Split(features, domain, label)
    return MultiDomainDataset(name, specs, tuple(f"d{i}" for i in range(D)), split, split, split)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B and c (they start at zero), so the adapter terms are really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def per_sample_tower(tower: Tower, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """The tower written out one sample at a time, straight from DESIGN.md section 2."""
    out = []
    for n in range(x.shape[0]):
        d = int(domain[n])
        h = x[n]
        if tower.routing is Routing.MIXTURE:
            assert tower.gate is not None
            g = torch.softmax(tower.gate.linear.weight @ tower.gate.embedding.weight[d] + tower.gate.linear.bias, 0)
        for layer in tower.layers:
            z = h @ layer.weight.T + layer.bias
            if tower.routing is Routing.DOMAIN:
                z = z + (h @ layer.lora_A[d]) @ layer.lora_B[d] + layer.lora_c[d]
            elif tower.routing is Routing.EXPERT:
                i = tower.active_expert
                z = z + (h @ layer.lora_A[i]) @ layer.lora_B[i] + layer.lora_c[i]
            elif tower.routing is Routing.MIXTURE:
                for e in range(tower.num_experts):
                    z = z + g[e] * ((h @ layer.lora_A[e]) @ layer.lora_B[e] + layer.lora_c[e])
            h = torch.relu(z)
        out.append(h @ tower.output.weight[0] + tower.output.bias[0])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("kind", "routing", "expert"),
    [
        (TowerKind.BASE, Routing.SHARED, None),
        (TowerKind.MLORA, Routing.DOMAIN, None),
        (TowerKind.MLORA, Routing.SHARED, None),
        (TowerKind.MOE_MLORA, Routing.MIXTURE, None),
        (TowerKind.MOE_MLORA, Routing.EXPERT, 4),  # expert 4 of 6 belongs to domain 1
        (TowerKind.MOE_MLORA, Routing.SHARED, None),
    ],
)
@pytest.mark.parametrize(
    "rows",
    [
        "mixed-13",  # 13 rows of random domains: not a multiple of anything
        "one-row",  # a single sample
        "one-domain",  # every row in domain 2, domains 0 and 1 absent
    ],
)
def test_tower_equals_per_sample_computation(
    kind: TowerKind, routing: Routing, expert: int | None, rows: str
) -> None:
    config = TowerConfig(kind=kind, hidden_units=(16, 12, 8), ranks=(4, 3, 1), experts_per_domain=2)
    tower = Tower(10, config, D, backend="reference").double().eval()
    randomise(tower)
    tower.set_routing(routing, expert)
    gen = torch.Generator().manual_seed(1)
    n = 1 if rows == "one-row" else 13
    x = torch.randn(n, 10, generator=gen, dtype=torch.float64)
    domain = torch.full((n,), 2) if rows == "one-domain" else torch.randint(0, D, (n,), generator=gen)
    tol = tolerance(torch.float64)
    torch.testing.assert_close(tower(x, domain), per_sample_tower(tower, x, domain), rtol=tol.rtol, atol=tol.atol)


def test_tower_shapes_and_routing_rules() -> None:
    moe = Tower(10, TowerConfig(kind=TowerKind.MOE_MLORA, experts_per_domain=2, alpha=32), D)
    assert moe.num_experts == 2 * D
    assert [(layer.num_experts, layer.rank) for layer in moe.layers] == [(6, 8), (6, 4), (6, 2)]
    assert [moe.expert_domain(i) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    gate = moe.gate_weights(torch.arange(D))
    assert gate.shape == (D, 6)
    torch.testing.assert_close(gate.sum(dim=1), torch.ones(D))
    with pytest.raises(ValueError, match="no 'domain' routing"):
        moe.set_routing(Routing.DOMAIN)
    with pytest.raises(ValueError, match="outside"):
        moe.set_routing(Routing.EXPERT, 6)
    base = Tower(10, TowerConfig(kind=TowerKind.BASE), D)
    with pytest.raises(ValueError, match="no 'mixture' routing"):
        base.set_routing(Routing.MIXTURE)
    assert base.adapter_parameters() == [] and base.gate_parameters() == []


@pytest.mark.parametrize("n", [2, 3, 40], ids=["fewer-rows-than-domains", "as-many", "more-rows"])
def test_domain_gate_per_domain_table_is_the_per_sample_gate(n: int) -> None:
    """Computed once per domain and gathered (more rows than domains) or per sample: the same
    weights and the same gradients as ``softmax(Linear(Embedding(domain)))`` written out."""
    moe = Tower(10, TowerConfig(kind=TowerKind.MOE_MLORA, experts_per_domain=2, alpha=32), D).double()
    gate = moe.gate
    assert gate is not None
    domain = torch.randint(0, D, (n,), generator=torch.Generator().manual_seed(n))
    upstream = torch.randn(n, 2 * D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = list(gate.parameters())

    def grads(weights: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad((weights * upstream).sum(), params))

    written_out = torch.softmax(gate.embedding.weight[domain] @ gate.linear.weight.T + gate.linear.bias, dim=-1)
    torch.testing.assert_close(gate(domain), written_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(gate(domain)), grads(written_out), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gate.table()[domain], gate(domain), rtol=1e-12, atol=1e-12)
    # A domain no row belongs to gets no gradient, as with the per-sample lookup.
    one_domain = torch.zeros(n, dtype=torch.long)
    (grad_embedding,) = torch.autograd.grad((gate(one_domain) * upstream).sum(), [gate.embedding.weight])
    assert torch.count_nonzero(grad_embedding[1:]) == 0 and torch.count_nonzero(grad_embedding[0]) > 0


@pytest.mark.parametrize("bad", [-1, D])
@pytest.mark.parametrize("n", [2, 40])
def test_domain_gate_refuses_ids_out_of_range(bad: int, n: int) -> None:
    moe = Tower(10, TowerConfig(kind=TowerKind.MOE_MLORA, experts_per_domain=1, alpha=32), D)
    domain = torch.zeros(n, dtype=torch.long)
    domain[n // 2] = bad
    with pytest.raises(ValueError, match=rf"domain id {bad} is outside \[0, {D}\)"):
        moe.gate_weights(domain)


def test_fresh_adapters_are_a_no_op() -> None:
    """B = c = 0 at init: a fresh MLoRA / MoE-MLoRA model computes what its shared path does."""
    ds = tiny_dataset()
    batch = ds.train.rows(torch.arange(len(ds.train)))
    for kind in ("mlora", "moe-mlora"):
        model = models.build("deepfm", ds, kind).eval()
        full = model(batch.features, batch.domain)
        model.tower.set_routing(Routing.SHARED)
        torch.testing.assert_close(full, model(batch.features, batch.domain), rtol=0, atol=0)


def embedded_fields(model: models.CTRModel, batch_features: dict[str, torch.Tensor], n: int) -> list[torch.Tensor]:
    """Per-field embedding of sample ``n``: a gather, or the sum over non-padding ids."""
    out = []
    for spec in model.features:
        ids = batch_features[spec.name][n]
        table = model.embedding.tables[spec.name]
        out.append(table[ids[ids != 0]].sum(0) if spec.multi_valued else table[ids])
    return out


def first_order(model: models.CTRModel, batch_features: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    total = torch.zeros(())
    for spec in model.features:
        ids = batch_features[spec.name][n]
        w = model.linear.weights.tables[spec.name][:, 0]
        total = total + (w[ids[ids != 0]].sum() if spec.multi_valued else w[ids])
    return total


@pytest.mark.parametrize("kind", ["base", "mlora", "moe-mlora"])
@pytest.mark.parametrize("name", ["deepfm", "wdl"])
def test_backbone_equals_per_sample_computation(name: str, kind: str) -> None:
    ds = tiny_dataset(n=9)
    model = models.build(name, ds, kind, tower_config=TowerConfig(hidden_units=(8, 6), ranks=(2, 1)))
    model.eval()
    randomise(model, seed=3)
    batch = ds.train.rows(torch.arange(9))
    features = dict(batch.features)
    got = model(features, batch.domain)
    expected = []
    for n in range(9):
        v = embedded_fields(model, features, n)
        logit = first_order(model, features, n)
        if name == "deepfm":
            logit = logit + sum(
                (v[i] * v[j]).sum() for i in range(len(v)) for j in range(i + 1, len(v))
            )
        x = torch.cat(v)[None]
        logit = logit + per_sample_tower(model.tower, x, batch.domain[n : n + 1])[0]
        expected.append(logit)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(got, torch.stack(expected), rtol=tol.rtol, atol=tol.atol)


def test_build_takes_ranks_from_the_alpha_table() -> None:
    ds = tiny_dataset()
    assert alpha_for("deepfm", "synthetic-paper") == 32  # MovieLens column
    assert alpha_for("deepfm", "taobao-10") == 256 and alpha_for("dcn", "amazon-6") == 128
    model = models.build("deepfm", ds, "mlora")
    assert [layer.rank for layer in model.tower.layers] == [8, 4, 2]
    assert [layer.num_experts for layer in model.tower.layers] == [D] * 3
    wdl = models.build("wdl", ds, "moe-mlora", experts_per_domain=3)
    assert [(layer.rank, layer.num_experts) for layer in wdl.tower.layers] == [(16, 9), (8, 9), (4, 9)]
    explicit = models.build("deepfm", ds, "mlora", tower_config=TowerConfig(alpha=4))
    assert [layer.rank for layer in explicit.tower.layers] == [64, 32, 16]


def test_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    ds = tiny_dataset()
    state = torch.random.get_rng_state()
    a = models.build("deepfm", ds, "moe-mlora", seed=5).state_dict()
    b = models.build("deepfm", ds, "moe-mlora", seed=5).state_dict()
    c = models.build("deepfm", ds, "moe-mlora", seed=6).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tower.layers.0.weight"], c["tower.layers.0.weight"])


def test_build_rejects_bad_arguments() -> None:
    ds = tiny_dataset()
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models.build("nope", ds)
    with pytest.raises(ValueError, match="unknown tower 'lora'"):
        models.build("deepfm", ds, "lora")
    with pytest.raises(ValueError, match="experts_per_domain must be > 0"):
        models.build("deepfm", ds, "moe-mlora", experts_per_domain=0)
    with pytest.raises(ValueError, match="one embedding dim"):
        models.build("deepfm", tiny_dataset(dims=(4, 8, 4)))
    models.build("wdl", tiny_dataset(dims=(4, 8, 4)))  # WDL has no FM term: mixed dims are fine


def test_first_order_weights_are_looked_up_with_the_embeddings(lookup_calls: list[int]) -> None:
    """Backbones with first-order weights make one lookup call for both collections, and the
    result equals two separate lookups."""
    from moefast.models import base

    ds = data.load("synthetic", preset="paper", seed=3, rows=2000)
    batch = ds.train.rows(torch.arange(50))
    for name in ("deepfm", "wdl", "pnn"):
        torch.manual_seed(0)
        model = models.build(name, ds, "mlora").eval()
        lookup_calls.clear()
        with torch.no_grad():
            joint = model(batch.features, batch.domain)
        fields = len(ds.features)
        assert lookup_calls == ([2 * fields] if model.linear is not None else [fields]), name
        if model.linear is not None:
            with pytest.MonkeyPatch.context() as patch, torch.no_grad():
                patch.setattr(base, "embed_together", lambda cs, f: [c(f) for c in cs])
                separate = model(batch.features, batch.domain)
            torch.testing.assert_close(joint, separate, rtol=0, atol=0)
