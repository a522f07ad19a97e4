"""Numerics (issue 15): non-finite or absurd hyperparameters are refused when the configuration
is built; a non-finite loss or score stops the stage with NonFiniteError; NaN scores are never
ranked into an AUC (one NaN on a positive row used to give an AUC of 1.0)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from moefast import cli, data, models
from moefast.config import EmbeddingOptimizer, TowerConfig, TrainConfig
from moefast.data.dataset import MultiDomainDataset
from moefast.reference.embedding_optim import LazyAdam, RowwiseAdagrad
from moefast.train import fit, loop
from moefast.train.loop import NonFiniteError
from moefast.train.metrics import auc, evaluate_scores

INF, NAN = math.inf, math.nan
FUSED = EmbeddingOptimizer.ROWWISE_ADAGRAD

BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"lr": INF}, r"lr must be a finite number in \(0, 10\], got inf"),
    ({"lr": 1e30}, r"lr must be a finite number in \(0, 10\]"),
    ({"lr": NAN}, r"lr must be a finite number"),
    ({"lr": 0.0}, r"lr must be a finite number"),
    ({"lr": -1e-3}, r"lr must be a finite number"),
    ({"l2": NAN}, r"l2 must be a finite number in \[0, 1\], got nan"),
    ({"l2": INF}, r"l2 must be a finite number"),
    ({"l2": -1e-5}, r"l2 must be a finite number"),
    ({"l2": 2.0}, r"l2 must be a finite number"),
    ({"eps": INF}, r"eps must be a finite number in \(0, 1\]"),
    ({"eps": 0.0}, r"eps must be a finite number"),
    ({"betas": (0.9, NAN)}, r"betas must be two numbers in \[0, 1\)"),
    ({"betas": (1.0, 0.999)}, r"betas must be two numbers"),
    ({"betas": (0.9,)}, r"betas must be two numbers"),
    ({"embedding_lr": INF, "embedding_optimizer": FUSED}, r"embedding_lr must be a finite number"),
    ({"embedding_lr": 1e30, "embedding_optimizer": FUSED}, r"embedding_lr must be a finite number"),
    ({"embedding_lr": 0.05}, r"embedding_lr applies to a fused embedding optimizer"),
    ({"batch_size": 0}, r"batch_size must be a whole number >= 1"),
    ({"batch_size": 256.5}, r"batch_size must be a whole number"),
    ({"max_epochs": INF}, r"max_epochs must be a whole number"),
    ({"patience": True}, r"patience must be a whole number"),
    ({"seed": 1.5}, r"seed must be a whole number"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_CONFIGS, ids=[str(k) for k, _ in BAD_CONFIGS])
def test_bad_hyperparameters_are_refused_when_the_config_is_built(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_the_edges_of_the_ranges_are_accepted() -> None:
    TrainConfig(lr=10.0, eps=1.0, l2=1.0, betas=(0.0, 0.0))
    TrainConfig(l2=0.0, embedding_optimizer=FUSED, embedding_lr=10.0)


@pytest.mark.parametrize("make", [RowwiseAdagrad, LazyAdam])
@pytest.mark.parametrize("eps", [INF, NAN, 0.0])
def test_fused_optimizers_refuse_non_finite_eps(make: Any, eps: float) -> None:
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        make(eps=eps)


@pytest.mark.parametrize("flag", [["--lr", "inf"], ["--lr", "1e30"], ["--l2", "inf"], ["--l2", "nan"]])
def test_cli_refuses_them_in_one_line_before_loading_data(flag: list[str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", *flag, "--quiet", "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err.strip()
    assert "must be a finite number" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_nan_scores_are_never_ranked_into_an_auc() -> None:
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    scores = torch.tensor([NAN, 0.1, 0.2, 0.3])  # ranked, the NaN on a positive row gave 1.0
    with pytest.raises(ValueError, match=r"auc: 1 of 4 scores are NaN"):
        auc(scores, labels)
    with pytest.raises(ValueError, match=r"auc: 1 of 2 scores are NaN"):
        auc(torch.tensor([NAN, 0.5]), torch.tensor([1.0, 1.0]))  # even where no AUC exists
    with pytest.raises(ValueError, match=r"evaluate_scores: 1 of 4 scores are NaN"):
        evaluate_scores(scores, labels, torch.tensor([0, 0, 1, 1]), ["a", "b"])
    # Infinite logits still rank (a probability of 1 or 0).
    assert auc(torch.tensor([INF, -INF, 0.5, 0.2]), labels) == 1.0


SMALL = TowerConfig(hidden_units=(8,), ranks=(1,))


@pytest.fixture(scope="module")
def ds() -> MultiDomainDataset:
    return data.load("synthetic", preset="paper", rows=600, num_domains=2)


def test_a_non_finite_loss_stops_the_stage_before_the_step(ds: MultiDomainDataset) -> None:
    model = models.build("deepfm", ds, "mlora", tower_config=SMALL)
    with torch.no_grad():
        model.tower.layers[0].weight[0, 0] = NAN  # the first loss is NaN
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteError, match=r"\[1/1\] joint epoch 1, batch 0: the training loss is nan"):
        fit(model, ds, TrainConfig(max_epochs=1, batch_size=128, progress=False))
    for name, p in model.named_parameters():  # stopped before any update
        assert torch.equal(p, untouched[name]) or name == "tower.layers.0.weight", name


@pytest.mark.parametrize("where", ["validation", "test"])
def test_non_finite_scores_stop_before_any_auc(ds: MultiDomainDataset, where: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop.predict
    calls = {"n": 0}

    def predict(*args: Any, **kwargs: Any) -> torch.Tensor:
        logits = real(*args, **kwargs)
        calls["n"] += 1
        if where == "test" and args[1] is not ds.test:
            return logits  # validation stays finite
        logits[0] = INF if where == "test" else NAN
        return logits

    monkeypatch.setattr(loop, "predict", predict)
    model = models.build("deepfm", ds, "base", tower_config=SMALL)
    with pytest.raises(NonFiniteError, match=rf"{where}: 1 of \d+ scores are not finite"):
        fit(model, ds, TrainConfig(max_epochs=1, batch_size=256, progress=False))
    assert calls["n"] >= 1
