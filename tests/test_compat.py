"""``TrainConfig.seeds_compat``: each of the public code's three run-time behaviours switches.

The validation AUC is scripted (the real evaluation runs, then its mean AUC is replaced), so
which epochs improve is known in advance and each behaviour shows in the stage checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_models import tiny_dataset

from moefast import models
from moefast.config import TowerConfig, TrainConfig
from moefast.runs.checkpoint import read_checkpoint
from moefast.train import loop
from moefast.train.metrics import EvalMetrics

# Tiny runs: one torch thread is as fast as two, and a shared machine's busy core cannot stall it.
pytestmark = pytest.mark.usefixtures("one_thread")

# No dropout: with a width-8 tower, some dropout draws silence every unit of a small domain's
# batches, and then an expert stage legitimately learns nothing; these tests are about which
# weights a stage may change, not about dropout.
TOWER = TowerConfig(hidden_units=(8, 4), ranks=(2, 1), dropout=0.0)


def script_validation(monkeypatch: pytest.MonkeyPatch, scores: Callable[[int], float]) -> None:
    """The ``k``-th validation evaluation (from 0) reports mean AUC ``scores(k)``."""
    real = loop.evaluate_scores
    count = iter(range(10**6))

    def scripted(*args: Any, **kwargs: Any) -> EvalMetrics:
        metrics = real(*args, **kwargs)
        if "domains" not in kwargs:  # the test split
            return metrics
        return dataclasses.replace(metrics, mean_auc=scores(next(count)))

    monkeypatch.setattr(loop, "evaluate_scores", scripted)


def checkpoints(run: Path) -> Iterator[dict[str, torch.Tensor]]:
    for path in sorted((run / "checkpoints").glob("*.pt")):
        yield read_checkpoint(path)["state_dict"]  # reassembled (a stage stores what it changed)


def config(compat: bool, **overrides: Any) -> TrainConfig:
    base = TrainConfig(max_epochs=2, patience=1, batch_size=16, progress=False, seeds_compat=compat, eval_every=None)
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize("compat", [False, True])
def test_backbone_trains_in_every_stage(compat: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script_validation(monkeypatch, lambda k: 0.5 + 0.01 * k)  # every epoch improves
    ds = tiny_dataset()
    model = models.build("deepfm", ds, "moe-mlora", tower_config=TOWER)
    loop.fit(model, ds, config(compat), out_dir=tmp_path)
    backbone, expert0, *_ = checkpoints(tmp_path)
    for name in ("embedding.tables.uid", "linear.weights.tables.item"):
        assert torch.equal(backbone[name], expert0[name]) is not compat, name


@pytest.mark.parametrize("compat", [False, True])
def test_best_validation_score_carries_across_stages(
    compat: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Backbone: 0.9 then 0.8 (stops, best 0.9); afterwards every epoch scores below 0.9.
    script_validation(monkeypatch, lambda k: [0.9, 0.8][k] if k < 2 else 0.6 + 0.001 * k)
    ds = tiny_dataset()
    model = models.build("wdl", ds, "moe-mlora", tower_config=TOWER)
    result = loop.fit(model, ds, config(compat), out_dir=tmp_path)
    assert result.stages[0].best_val_mean_auc == 0.9
    later = [s.best_val_mean_auc for s in result.stages[1:]]
    if compat:
        # No later stage beats 0.9: each keeps the weights it started from.
        assert later == [0.9] * len(later)
        states = list(checkpoints(tmp_path))
        assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    else:
        assert all(0.6 < b < 0.9 for b in later)
        backbone, expert0, *_ = checkpoints(tmp_path)
        assert not torch.equal(backbone["tower.layers.0.lora_A"], expert0["tower.layers.0.lora_A"])


@pytest.mark.parametrize("compat", [False, True])
def test_weights_revert_to_the_best_after_every_epoch(compat: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    script_validation(monkeypatch, lambda k: [0.6, 0.5, 0.55][k])  # epoch 2 does not improve
    starts: list[dict[str, torch.Tensor]] = []
    real_epoch = loop._train_epoch

    def spy(model: torch.nn.Module, *args: Any, **kwargs: Any) -> int:
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_epoch(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "_train_epoch", spy)
    ds = tiny_dataset()
    model = models.build("deepfm", ds, "base", tower_config=TOWER)
    loop.fit(model, ds, config(compat, max_epochs=3, patience=3))
    assert len(starts) == 3
    # Epoch 3 starts from epoch 1's end (the best) with the revert, from epoch 2's end without.
    same = all(torch.equal(starts[1][k], starts[2][k]) for k in starts[1])
    assert same is compat


def test_compat_is_off_by_default() -> None:
    assert TrainConfig().seeds_compat is False
