"""Issue 24's protocol: the budget (what ends a stage, recorded and resumed), dropout on frozen
paths, and ``--seeds-compat`` as the seeds' code runs (docs/method.md).

The validation AUC is scripted where the test is about stopping (as in ``test_compat.py``), so
which validations improve is known in advance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _resume_run as tiny
import pytest
import torch
from test_compat import script_validation
from test_models import tiny_dataset

from moefast import data, models
from moefast.config import GateInit, SeedsGate, TowerConfig, TrainConfig
from moefast.models.base import CTRModel
from moefast.nn.tower import DomainGate
from moefast.train import loop
from moefast.train.errors import CapWarning
from moefast.train.stages import Stage, StageStep, apply_frozen_path_dropout, plan_stages, set_stage

# Tiny runs: one torch thread is as fast as two, and a shared machine's busy core cannot stall it.
pytestmark = pytest.mark.usefixtures("one_thread")

TOWER = TowerConfig(hidden_units=(8, 4), ranks=(2, 1), dropout=0.0)


def _config(**overrides: Any) -> TrainConfig:
    base = TrainConfig(max_epochs=3, patience=2, batch_size=16, progress=False, eval_every=None)
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize(
    ("scores", "overrides", "stopped_by", "best_epoch", "epochs", "validations"),
    [
        # Every validation improves: the epoch cap ends the stage, still improving.
        (lambda k: 0.5 + 0.01 * k, {}, "cap", 3, 3, 3),
        # Patience (2) runs out on the cap's last epoch: that is patience, not the cap.
        (lambda k: [0.9, 0.8, 0.7][k], {}, "patience", 1, 3, 3),
        # Patience runs out before the cap.
        (lambda k: [0.9, 0.8, 0.7][k], {"max_epochs": 10}, "patience", 1, 3, 3),
        # Steps: 64 rows in batches of 16 = 4 steps an epoch; a validation every 3 steps and a cap
        # of 7 steps: validations after steps 3, 6 and at the cap (7), all improving.
        (lambda k: 0.5 + 0.01 * k, {"eval_every": 3, "max_steps": 7, "max_epochs": None}, "cap", 2, 2, 3),
        # The same budget, no improvement after the first: patience ends it at step 6, mid-epoch 2.
        (lambda k: 0.9 - 0.1 * k, {"eval_every": 3, "max_steps": 7, "max_epochs": None}, "patience", 1, 2, 3),
    ],
    ids=["epoch-cap", "patience-on-the-cap", "patience", "step-cap", "patience-mid-epoch"],
)
def test_what_ended_a_stage_is_recorded_and_survives_a_resume(
    scores: Any, overrides: dict[str, Any], stopped_by: str, best_epoch: int, epochs: int, validations: int,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    script_validation(monkeypatch, scores)
    ds = tiny_dataset()
    config = _config(**overrides)
    with pytest.warns(CapWarning) if stopped_by == "cap" else _no_cap_warning():
        result = loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, config, out_dir=tmp_path / "run")
    (stage,) = result.metrics["stages"]
    assert (stage["stopped_by"], stage["capped"]) == (stopped_by, stopped_by == "cap")
    assert (stage["best_epoch"], stage["epochs"], len(stage["val_history"])) == (best_epoch, epochs, validations)
    assert stage["steps"] == len(result.stages[0].losses)
    # A resumed finished run reads its records back from the snapshot.
    again = loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, config, out_dir=tmp_path / "run",
                     resume=True)
    assert again.metrics["stages"][0] == {**stage, "seconds": again.metrics["stages"][0]["seconds"]}


@contextlib.contextmanager
def _no_cap_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapWarning)
        yield


def test_a_step_budget_resumes_bitwise_from_a_mid_epoch_validation(tmp_path: Path) -> None:
    """A snapshot written after a validation inside an epoch continues that epoch's order."""
    ds = tiny_dataset()
    config = _config(eval_every=3, max_steps=11, max_epochs=None, patience=5)
    whole = loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, config, out_dir=tmp_path / "whole")

    # Cut right after the second snapshot, the one after step 6's validation (mid-epoch 2).
    with tiny.stopping_after_snapshot(2), pytest.raises(tiny.StoppedAfterSnapshot):
        loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, config, out_dir=tmp_path / "cut")
    resumed = loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, config, out_dir=tmp_path / "cut",
                       resume=True)
    assert resumed.stages[0].losses == whole.stages[0].losses
    assert torch.equal(resumed.test_logits, whole.test_logits)


@pytest.mark.parametrize(("interval", "snapshots"), [(math.inf, 2), (0.0, 9)])
def test_epoch_end_snapshots_are_paced_by_time(
    interval: float, snapshots: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-step epochs (an expert's on a small domain) do not each write a snapshot: an epoch's
    end writes one only when the stage wrote none for ``SNAPSHOT_SECONDS``, and validations and
    the stage's end always do."""
    ds = tiny_dataset()
    # 64 rows in one batch: 9 one-step epochs, no validation before the stage's end at the cap.
    config = _config(batch_size=64, eval_every=100, max_steps=None, max_epochs=9)
    monkeypatch.setattr(loop, "SNAPSHOT_SECONDS", interval)
    written: list[int] = []
    real = loop._Saver.in_stage
    monkeypatch.setattr(loop._Saver, "in_stage", lambda self, stage: (written.append(stage["epochs"]),
                                                                     real(self, stage))[1])
    with pytest.warns(CapWarning):
        loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, config, out_dir=tmp_path / "run")
    # Without pacing, every epoch's end; with it, the first epoch's end and the stage's end only.
    assert len(written) == snapshots
    assert written[-1] == 9


def _two_passes_equal(model: CTRModel, batch: Any) -> bool:
    model.train()
    torch.manual_seed(0)
    first = model(batch.features, batch.domain)
    second = model(batch.features, batch.domain)
    return torch.equal(first, second)


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("frozen_path_dropout", [False, True])
def test_frozen_path_dropout(backend: str, frozen_path_dropout: bool) -> None:
    """Off: the stages whose shared path is frozen (experts, gate, MLoRA's adapters) draw no mask,
    so two training-mode passes agree; the stages that train it (backbone, joint) still draw.
    On: every stage draws."""
    ds = tiny_dataset()
    tower = dataclasses.replace(TOWER, dropout=0.5)
    batch = ds.train.rows(torch.arange(len(ds.train)))
    moe = models.build("deepfm", ds, "moe-mlora", tower_config=tower)
    mlora = models.build("deepfm", ds, "mlora", tower_config=tower)
    base = models.build("deepfm", ds, "base", tower_config=tower)
    for model in (moe, mlora, base):
        loop._set_backend(model, backend)
    cases = [(moe, StageStep(Stage.BACKBONE), True), (moe, StageStep(Stage.EXPERT, 1), False),
             (moe, StageStep(Stage.GATE), False), (mlora, StageStep(Stage.JOINT), True),
             (mlora, StageStep(Stage.ADAPTERS), False), (base, StageStep(Stage.JOINT), True)]
    for model, step, trains_shared in cases:
        set_stage(model, step)
        assert apply_frozen_path_dropout(model, frozen_path_dropout) is (trains_shared or frozen_path_dropout)
        deterministic = not (trains_shared or frozen_path_dropout)
        assert _two_passes_equal(model, batch) is deterministic, (model.tower.kind, step, backend)


def test_frozen_path_dropout_reaches_the_expert_stages_of_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, bool]] = []
    real = loop._train_epoch

    def spy(model: CTRModel, loader: Any, step: StageStep, *args: Any, **kwargs: Any) -> int:
        seen.append((step.label, model.tower.hidden_layers()[0].dropout_active))
        return real(model, loader, step, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", spy)
    ds = tiny_dataset()
    tower = dataclasses.replace(TOWER, dropout=0.5)
    loop.fit(models.build("deepfm", ds, "moe-mlora", tower_config=tower), ds,
             _config(max_epochs=1, frozen_path_dropout=False))
    assert seen == [("backbone", True), *((f"expert_{i}", False) for i in range(3)), ("gate", False)]


# ---------------------------------------------------------------------------------------------
# --seeds-compat: the seeds' code as it runs under TF 1.12
# ---------------------------------------------------------------------------------------------


def _stage_states(model: CTRModel, ds: Any, config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The model's state before the first stage and after each stage (every validation improves,
    so no stage reverts to an earlier stage's weights)."""
    script_validation(monkeypatch, lambda k: 0.5 + 0.001 * k)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    real = loop._run_stage

    def spy(*args: Any, **kwargs: Any) -> Any:
        record = real(*args, **kwargs)
        states.append({k: v.clone() for k, v in args[0].model.state_dict().items()})  # args[0]: the _StageContext
        return record

    monkeypatch.setattr(loop, "_run_stage", spy)
    loop.fit(model, ds, config)
    return states


@pytest.mark.parametrize("seeds_gate", list(SeedsGate))
def test_seeds_compat_trains_every_weight_in_every_stage(seeds_gate: SeedsGate, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parameter but the frozen pretrained tables (and the gate, as docs/method.md says)
    changes in every stage, backbone and experts included: the seeds' graph is built once with
    the gate, so no routing switch or freeze takes effect."""
    ds = data.load("synthetic", preset="taobao", rows=600, num_domains=3, num_users=40, num_items=30, seed=3)
    model = models.build("deepfm", ds, "moe-mlora", tower_config=dataclasses.replace(TOWER, gate_init=GateInit.KERAS))
    config = _config(max_epochs=1, seeds_compat=True, seeds_gate=seeds_gate, batch_size=64)
    states = _stage_states(model, ds, config, monkeypatch)
    pretrained = {name for name, p in model.named_parameters() if any(p is q for q in model.pretrained_parameters())}
    assert pretrained, "the taobao preset has pretrained tables"
    labels = [s.label for s in plan_stages(model)]
    for label, before, after in zip(labels, states[:-1], states[1:], strict=True):
        for name, _ in model.named_parameters():
            changed = not torch.equal(before[name], after[name])
            gate_linear_trains = seeds_gate is SeedsGate.GATE_STAGE and label == "gate" and name.startswith("tower.gate.linear")
            if name in pretrained or (name.startswith("tower.gate.") and not gate_linear_trains):
                assert not changed, (label, name)
            else:
                assert changed, (label, name)


def test_seeds_compat_carries_one_adam_across_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = tiny_dataset()
    seen: list[int] = []
    real = loop._run_stage

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(id(kwargs["optimizer"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_run_stage", spy)
    loop.fit(models.build("deepfm", ds, "moe-mlora", tower_config=TOWER), ds, _config(max_epochs=1, seeds_compat=True))
    assert len(seen) == 5 and len(set(seen)) == 1


@pytest.mark.parametrize(("start", "near_uniform"), [(GateInit.KERAS, True), (GateInit.RANDOM, False)])
def test_the_keras_gate_start_is_near_uniform(start: GateInit, near_uniform: bool) -> None:
    """At 20 domains (the core), every weight of the seeds' Keras start lies within 25% of 1/E;
    torch's default start (GateInit.RANDOM, once documented as the seeds') does not."""
    torch.manual_seed(0)
    gate = DomainGate(20, 20)
    if start is GateInit.KERAS:
        gate.start_like_keras()
    table = gate.table().detach()
    within = bool(((table - 1 / 20).abs() <= 0.25 / 20).all())
    assert within is near_uniform
    assert math.isclose(float(table.sum(dim=1).mean()), 1.0, rel_tol=1e-6)
