"""``moefast.export.merge``: the per-domain merged tower equals the trained model's eval output.

Freshly built adapters are zero (B = c = 0), so a merge that dropped them would pass on a fresh
model: every test first randomises B, c, the gate and the embedding tables (trained tables are not
the 1e-4 start, and the tower's inputs must not vanish). The bound is a relative difference
``max|merged - model| / max|model| <= 1e-5`` (fp32: both sides round differently, the merge in
float64 once). Every test also checks that the adapters change the output far beyond that bound,
so a no-op merge fails.
"""

from __future__ import annotations

import pytest
import torch

from moefast import models
from moefast.config import FeatureSpec, NumericSpec, Pooling, TowerConfig
from moefast.data import MultiDomainDataset, Split, load
from moefast.export import MergedTower, merge, merge_tower, serving_module
from moefast.nn.tower import DomainGate, Routing

REL = 1e-5
# The adapters' effect on the logits must be far above REL for a test to tell a merge from none.
ADAPTER_EFFECT = 1e-3
BACKBONES = sorted(models.MODELS)
# (tower kind, experts per domain): base, MLoRA, MoE-MLoRA with 1 and 2 experts per domain.
TOWERS = [("base", 1), ("mlora", 1), ("moe-mlora", 1), ("moe-mlora", 2)]

# Small shapes gain nothing from a second thread; on a loaded 2-core machine the hand-offs cost
# up to 30x the work (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def dataset() -> MultiDomainDataset:
    return load("synthetic", preset="paper", rows=1500, num_domains=4, num_users=80, num_items=40)


def randomise(model: models.CTRModel, seed: int = 0) -> models.CTRModel:
    """Random embedding tables, adapter B and c, and gate (A is random from the start)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in model.embedding.tables.values():
            table.copy_(torch.randn(table.shape, generator=g) * 0.3)
        for layer in model.tower.hidden_layers():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            layer.lora_c.copy_(torch.randn(layer.lora_c.shape, generator=g) * 0.1)
        for p in model.tower.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def shared_only(model: models.CTRModel, features: dict[str, torch.Tensor], domain: torch.Tensor) -> torch.Tensor:
    """The model's output without its adapters (the shared routing)."""
    routing, expert = model.tower.routing, model.tower.active_expert
    model.tower.set_routing(Routing.SHARED)
    try:
        with torch.no_grad():
            return model(features, domain)
    finally:
        model.tower.set_routing(routing, expert)


def mixed_batch(dataset: MultiDomainDataset, rows: int = 192) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    batch = dataset.test.rows(torch.arange(rows))
    assert len(set(batch.domain.tolist())) == dataset.num_domains  # every domain, interleaved
    return dict(batch.features), batch.domain


@pytest.mark.parametrize(("kind", "experts"), TOWERS, ids=[f"{k}-{e}" for k, e in TOWERS])
@pytest.mark.parametrize("name", BACKBONES)
def test_merged_equals_the_model(dataset: MultiDomainDataset, name: str, kind: str, experts: int) -> None:
    model = randomise(models.build(name, dataset, kind, experts_per_domain=experts, seed=1))
    features, domain = mixed_batch(dataset)
    with torch.no_grad():
        expected = model(features, domain)
    merged = merge(model)
    got = merged(features, domain)
    assert rel_diff(got, expected) <= REL
    # The torch-only form the program is exported from computes the same (every backbone).
    assert rel_diff(serving_module(merge(model, backend="reference"))(features, domain), expected) <= REL
    if kind != "base":
        assert rel_diff(shared_only(model, features, domain), expected) > ADAPTER_EFFECT
    tower = merged.backbone.tower
    assert isinstance(tower, MergedTower)
    assert tower.layer(0)[0].shape == (dataset.num_domains, model.tower.layers[0].in_features,
                                       model.tower.layers[0].out_features)


def test_the_cpp_op_is_the_loop(dataset: MultiDomainDataset) -> None:
    """``torch.ops.moefast.merged_tower`` (what runs on CPU when built) equals the torch loop it
    implements (what the program exports): mixed rows, a domain with none, one row, no rows; and
    it is bitwise the same at 1, 2 and 3 threads, for large units and for units of a few rows
    (its units depend on the data alone, and every product runs on one thread)."""
    from moefast.export._merge import _merged_tower_op

    if _merged_tower_op() is None:
        pytest.skip("moefast._tower_ops is not built here")
    tower = merge(randomise(models.build("dcn", dataset, "moe-mlora", experts_per_domain=2, seed=9))).backbone.tower
    assert isinstance(tower, MergedTower)
    g = torch.Generator().manual_seed(9)
    # 5000 rows over 3 domains: every domain is cut into several work units of up to 1024 rows.
    x = torch.randn(5000, tower.layer(0)[0].shape[1], generator=g)
    domain = torch.randint(0, dataset.num_domains, (5000,), generator=g)
    domain[domain == 1] = 3
    for rows in (slice(None), slice(5, 6), slice(0, 0)):
        with torch.no_grad():
            got, want = tower(x[rows], domain[rows]), tower.grouped_forward(x[rows], domain[rows])
        assert got.shape == want.shape
        if want.numel():
            assert rel_diff(got, want) <= REL
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            # 5000 rows: units of about 550 rows; 64 and 7 rows: a few rows per domain, where an
            # MKL-threaded product rounded differently (review); 1 row: a single unit.
            for rows in (slice(None), slice(0, 64), slice(0, 7), slice(3, 4)):
                torch.set_num_threads(1)
                one = tower(x[rows], domain[rows])
                for count in (2, 3):
                    torch.set_num_threads(count)
                    assert torch.equal(tower(x[rows], domain[rows]), one), f"{count} threads, rows {rows}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("routing", [Routing.SHARED, Routing.EXPERT])
def test_every_routing_merges(dataset: MultiDomainDataset, routing: Routing) -> None:
    """The merge follows the routing the model is in (the expert stage: one expert everywhere)."""
    model = randomise(models.build("deepfm", dataset, "moe-mlora", experts_per_domain=2, seed=2))
    model.tower.set_routing(routing, 5 if routing is Routing.EXPERT else None)
    features, domain = mixed_batch(dataset)
    with torch.no_grad():
        expected = model(features, domain)
    assert rel_diff(merge(model)(features, domain), expected) <= REL


def test_merge_does_not_touch_the_model(dataset: MultiDomainDataset) -> None:
    model = randomise(models.build("wdl", dataset, "mlora", seed=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(model.state_dict())
    merged = merge(model)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        next(iter(merged.backbone.embedding.tables.values())).add_(1.0)  # a copy, not shared
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="inference only"):
        merged.train()


def test_awkward_batches(dataset: MultiDomainDataset) -> None:
    """A domain with no rows, every row in one domain, a single row, no rows at all."""
    model = randomise(models.build("dcn", dataset, "moe-mlora", seed=4))
    merged = merge(model)
    features, domain = mixed_batch(dataset)
    for rows in (domain != 2, domain == 1, torch.arange(len(domain)) == 7):
        sub = {k: v[rows] for k, v in features.items()}
        with torch.no_grad():
            expected = model(sub, domain[rows])
        assert rel_diff(merged(sub, domain[rows]), expected) <= REL
    empty = {k: v[:0] for k, v in features.items()}
    assert merged(empty, domain[:0]).shape == (0,)


def test_an_unknown_domain_is_refused(dataset: MultiDomainDataset) -> None:
    merged = merge(randomise(models.build("pnn", dataset, "mlora", seed=5)))
    features, domain = mixed_batch(dataset, 16)
    for bad in (dataset.num_domains, -1):
        wrong = domain.clone()
        wrong[3] = bad
        with pytest.raises(ValueError, match=f"domain id {bad} is outside"):
            merged(features, wrong)


def test_a_gate_that_sees_more_than_the_domain_is_refused(dataset: MultiDomainDataset) -> None:
    class FeatureGate(DomainGate):
        """An extension DESIGN.md allows: a gate that would also read the sample."""

    model = models.build("deepfm", dataset, "moe-mlora", seed=6)
    gate = FeatureGate(dataset.num_domains, model.tower.num_experts)
    gate.load_state_dict(model.tower.gate.state_dict())  # type: ignore[union-attr]
    model.tower.gate = gate
    with pytest.raises(ValueError, match="FeatureGate, not moefast's DomainGate"):
        merge(model)
    model.tower.layers[1] = torch.nn.Linear(4, 4)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="tower layer 1 is a Linear"):
        merge_tower(model.tower)


def _pooled_dataset() -> MultiDomainDataset:
    """Single-valued, sum- and mean-pooled fields (with padding and empty bags), two numeric
    fields, 3 domains."""
    g = torch.Generator().manual_seed(7)
    specs = (FeatureSpec("user", 30, 8), FeatureSpec("tags", 12, 8, Pooling.SUM),
             FeatureSpec("genres", 9, 8, Pooling.MEAN))

    def split(n: int) -> Split:
        tags = torch.randint(0, 12, (n, 5), generator=g)
        tags[:, 3:] = 0  # right padding
        genres = torch.randint(1, 9, (n, 4), generator=g)
        genres[::5] = 0  # empty bags
        return Split({"user": torch.randint(0, 30, (n,), generator=g), "tags": tags, "genres": genres,
                      "price": torch.randn(n, generator=g), "age": torch.rand(n, generator=g)},
                     torch.arange(n) % 3, (torch.rand(n, generator=g) < 0.5).float())

    return MultiDomainDataset("pooled", specs, ("a", "b", "c"), split(60), split(20), split(40),
                              numeric=(NumericSpec("price"), NumericSpec("age")))


@pytest.mark.parametrize("name", ["deepfm", "fibinet"])
def test_pooled_and_numeric_fields(name: str) -> None:
    """Multi-valued fields: torch's lookups in the exported form pool as moefast's do; numeric
    fields reach the tower (and DeepFM's first-order part) as in the model."""
    dataset = _pooled_dataset()
    model = randomise(models.build(name, dataset, "moe-mlora", seed=8,
                                   tower_config=TowerConfig(hidden_units=(32, 16))))
    batch = dataset.test.rows(torch.arange(40))
    with torch.no_grad():
        expected = model(batch.features, batch.domain)
    assert rel_diff(merge(model)(batch.features, batch.domain), expected) <= REL
    serving = serving_module(merge(model, backend="reference"))
    numeric = torch.stack([batch.features["price"], batch.features["age"]], dim=1)  # [B, 2]
    ids = {k: v for k, v in batch.features.items() if k not in ("price", "age")}
    assert rel_diff(serving(ids, numeric, batch.domain), expected) <= REL
    moved = dict(batch.features, price=batch.features["price"] + 1.0)  # the numeric fields matter
    with torch.no_grad():
        assert rel_diff(model(moved, batch.domain), expected) > ADAPTER_EFFECT
