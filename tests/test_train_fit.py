"""fit(): early stopping, best weights, checkpoints across stages, determinism, run directory."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moefast import data, models
from moefast.config import BatchMode, ExpertStopRule, TowerConfig, TrainConfig
from moefast.data.dataset import MultiDomainDataset
from moefast.nn.tower import Routing
from moefast.train import fit, load_checkpoint, predict, save_checkpoint
from moefast.train.loop import EarlyStopping
from moefast.train.metrics import evaluate_scores
from moefast.train.stages import plan_stages

SMALL = TowerConfig(hidden_units=(16, 8), ranks=(2, 1))
QUICK = TrainConfig(max_epochs=2, batch_size=256, progress=False)


@pytest.fixture(scope="module")
def ds() -> MultiDomainDataset:
    return data.load("synthetic", preset="paper", rows=3000, num_domains=3)


def test_early_stopping_is_strict_with_patience() -> None:
    stop = EarlyStopping(patience=3)
    assert stop.update(0.5) and not stop.should_stop
    assert not stop.update(0.5)  # equal is no improvement
    assert not stop.update(math.nan)  # an undefined AUC never improves
    assert not stop.should_stop
    assert stop.update(0.6) and stop.stale == 0
    for _ in range(3):
        assert not stop.update(0.59)
    assert stop.should_stop and stop.best == 0.6
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)


def test_same_seed_same_metrics() -> None:
    small = data.load("synthetic", preset="paper", rows=1200, num_domains=2)

    def run(seed: int) -> dict[str, object]:
        model = models.build("deepfm", small, "moe-mlora", tower_config=SMALL)
        config = TrainConfig(max_epochs=1, batch_size=256, progress=False, seed=seed)
        metrics = fit(model, small, config).metrics
        for stage in metrics["stages"]:  # type: ignore[attr-defined]
            del stage["seconds"]
        del metrics["train_samples_per_second"]
        return metrics

    first = run(1)
    assert run(1) == first
    assert run(2) != first


def test_stage_ends_at_its_best_weights_and_checkpoints_chain(ds: MultiDomainDataset, tmp_path: Path) -> None:
    model = models.build("deepfm", ds, "moe-mlora", tower_config=SMALL)
    # Enough epochs at a high learning rate that validation AUC peaks and falls again.
    config = TrainConfig(max_epochs=4, patience=1, lr=3e-2, batch_size=256, progress=False, eval_every=None)
    result = fit(model, ds, config, out_dir=tmp_path)
    gate = result.stages[-1]
    assert gate.label == "gate"
    val = evaluate_scores(predict(model, ds.val), ds.val.label, ds.val.domain, ds.domain_names)
    assert val.mean_auc == gate.best_val_mean_auc == max(gate.val_history)
    assert result.metrics["stages"][-1]["best_val_mean_auc"] == gate.best_val_mean_auc
    assert any(len(r.val_history) < 4 for r in result.stages), "no stage stopped early"

    # Every stage's checkpoint loads strictly, carries its stage, and refuses another label.
    plan = plan_stages(model)
    files = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert [f.name for f in files] == [f"{i:02d}_{s.label}.pt" for i, s in enumerate(plan)]
    assert not list((tmp_path / "checkpoints").glob("*.tmp")), "temporary file left behind"
    fresh = models.build("deepfm", ds, "moe-mlora", tower_config=SMALL, seed=99)
    meta = load_checkpoint(files[-1], fresh, expected_stage="gate")
    assert meta["stage"] == "gate" and meta["model"] == "deepfm"
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="holds stage 'backbone', expected 'expert_0'"):
        load_checkpoint(files[0], fresh, expected_stage="expert_0")
    mlora = models.build("deepfm", ds, "mlora", tower_config=SMALL)
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(files[0], mlora)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", fresh)

    # A round trip of a checkpoint written by hand keeps every tensor bitwise.
    path = save_checkpoint(tmp_path / "x" / "c.pt", mlora, "joint", {"note": 1})
    again = models.build("deepfm", ds, "mlora", tower_config=SMALL, seed=5)
    assert load_checkpoint(path, again, expected_stage="joint") == {"note": 1, "stage": "joint"}
    assert all(torch.equal(again.state_dict()[k], v) for k, v in mlora.state_dict().items())


@pytest.mark.parametrize("mode", [None, BatchMode.SINGLE_DOMAIN])
def test_expert_stage_sees_only_its_domain(
    ds: MultiDomainDataset, monkeypatch: pytest.MonkeyPatch, mode: BatchMode | None
) -> None:
    model = models.build("wdl", ds, "moe-mlora", experts_per_domain=2, tower_config=SMALL)
    seen: list[tuple[str, set[int]]] = []
    original = type(model).forward

    def spy(self: models.CTRModel, features: dict[str, torch.Tensor], domain: torch.Tensor) -> torch.Tensor:
        if self.training:
            route = self.tower.routing.value
            label = f"{route}_{self.tower.active_expert}" if route == "expert" else route
            seen.append((label, set(domain.tolist())))
        return original(self, features, domain)

    monkeypatch.setattr(type(model), "forward", spy)
    fit(model, ds, replace(QUICK, batch_mode=mode))
    for i in range(2 * ds.num_domains):
        domains = [d for label, d in seen if label == f"expert_{i}"]
        assert domains and all(d == {i % ds.num_domains} for d in domains)
    mixture = [d for label, d in seen if label == "mixture"]
    assert set().union(*mixture) == set(range(ds.num_domains))
    shared = [d for label, d in seen if not label.startswith("expert")]
    if mode is BatchMode.SINGLE_DOMAIN:
        assert all(len(d) == 1 for d in shared), "single-domain batches hold one domain each"
    else:  # the default: mixed batches in the backbone and gate stages
        assert any(len(d) > 1 for d in shared)


def test_default_batch_protocol() -> None:
    assert TrainConfig().batches is BatchMode.MIXED
    assert TrainConfig(seeds_compat=True).batches is BatchMode.SINGLE_DOMAIN
    assert TrainConfig(seeds_compat=True, batch_mode=BatchMode.MIXED).batches is BatchMode.MIXED


def test_run_directory(ds: MultiDomainDataset, tmp_path: Path) -> None:
    model = models.build("deepfm", ds, "moe-mlora", tower_config=SMALL)
    result = fit(model, ds, QUICK, out_dir=tmp_path, backend="reference")
    for name in ("settings.json", "metrics.json", "predictions.csv", "val_auc.png",
                 "per_domain_auc.png", "gate_weights.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert {"dataset", "model", "method", "backend", "device", "seed", "test", "stages",
            "train_samples_per_second"} <= set(metrics)
    assert (metrics["model"], metrics["method"], metrics["backend"]) == ("deepfm", "moe-mlora", "reference")
    assert {"wauc", "mean_auc", "logloss", "per_domain"} <= set(metrics["test"])
    assert [row["domain"] for row in metrics["test"]["per_domain"]] == list(range(ds.num_domains))
    assert sum(row["n"] for row in metrics["test"]["per_domain"]) == len(ds.test)
    for stage in metrics["stages"]:
        assert {"stage", "epochs", "best_val_mean_auc", "seconds"} <= set(stage)
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "domain,label,score" and len(lines) == len(ds.test) + 1
    scores = torch.tensor([float(line.split(",")[2]) for line in lines[1:]])
    torch.testing.assert_close(scores, torch.sigmoid(result.test_logits.double()).float())
    assert result.gate_weights is not None and result.gate_weights.shape == (ds.num_domains, ds.num_domains)


def test_fit_rejects_a_model_for_other_domains(ds: MultiDomainDataset) -> None:
    other = data.load("synthetic", preset="paper", rows=600, num_domains=2)
    model = models.build("deepfm", other, "mlora", tower_config=SMALL)
    with pytest.raises(ValueError, match="built for 2 domains"):
        fit(model, ds, QUICK)


def test_backend_reaches_every_layer_and_keeps_the_parameters(ds: MultiDomainDataset) -> None:
    model = models.build("deepfm", ds, "mlora", tower_config=SMALL)
    result = fit(model, ds, TrainConfig(max_epochs=1, batch_size=512, progress=False), backend="reference")
    assert result.metrics["backend"] == "reference"
    layers = [m for m in model.modules() if hasattr(m, "backend") and not isinstance(m, models.CTRModel)]
    assert len(layers) == 2 + 2  # two tower layers, embeddings, first-order weights
    assert all(m.backend is not None and m.backend.value == "reference" for m in layers)
    fast = models.build("deepfm", ds, "mlora", tower_config=SMALL, backend="fast")
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("rule", list(ExpertStopRule))
def test_expert_early_stopping_rule(ds: MultiDomainDataset, tmp_path: Path, rule: ExpertStopRule) -> None:
    """Own domain (default): expert i's AUC on domain i % D; all domains: the seeds' mean."""
    model = models.build("deepfm", ds, "moe-mlora", tower_config=SMALL)
    config = TrainConfig(max_epochs=1, batch_size=512, progress=False, expert_stop=rule)
    result = fit(model, ds, config, out_dir=tmp_path)
    expert = 1
    record = next(r for r in result.stages if r.label == f"expert_{expert}")
    assert record.checkpoint is not None
    load_checkpoint(record.checkpoint, model, expected_stage=record.label)
    model.tower.set_routing(Routing.EXPERT, expert)
    if rule is not ExpertStopRule.ALL_DOMAINS:
        # The same rows in the same batches as fit() evaluated, so the logits are bitwise equal.
        rows = torch.nonzero(ds.val.domain == expert % ds.num_domains).squeeze(1)
        own = evaluate_scores(predict(model, ds.val, rows=rows), ds.val.label[rows], ds.val.domain[rows],
                              ds.domain_names, domains=[expert % ds.num_domains])
        assert record.best_val_mean_auc == own.mean_auc == own.per_domain[0].auc
    else:
        val = evaluate_scores(predict(model, ds.val), ds.val.label, ds.val.domain, ds.domain_names)
        assert record.best_val_mean_auc == val.mean_auc
