"""Numeric features in every backbone (issue 17): the contract of ``CTRModel`` (numeric fields in
the ``features`` mapping, concatenated after ``tower_input``, a bias-free ``Linear(n, 1)`` in the
first-order part), backend parity with them, and a trained model that really uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moefast
from moefast import data, models, train
from moefast.config import TowerConfig, TowerKind
from moefast.data.dataset import MultiDomainDataset
from moefast.testing import TOLERANCES
from moefast.train.loop import predict
from moefast.train.metrics import evaluate_scores

TOWER = TowerConfig(hidden_units=(16, 8), ranks=(2, 1))


@pytest.fixture(scope="module")
def dataset() -> MultiDomainDataset:
    return data.load("synthetic", preset="paper", rows=3000, num_domains=2, numeric_fields=3)


@pytest.mark.parametrize("tower", [TowerKind.BASE, TowerKind.MOE_MLORA], ids=lambda k: k.value)
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_backbone_reads_its_numeric_fields_on_both_backends(
    dataset: MultiDomainDataset, name: str, tower: TowerKind
) -> None:
    batch = dataset.train.rows(torch.arange(32))
    out = {}
    for backend in ("reference", "fast"):
        model = models.build(name, dataset, tower, tower_config=TOWER, backend=backend).eval()  # no dropout
        assert model.tower_width == model.tower_in_features() + 3
        assert (model.dense_linear is not None) == model.first_order
        # The numeric columns get a gradient through the tower (and the linear part).
        x = {k: v.clone().requires_grad_(k.startswith("x")) for k, v in batch.features.items()}
        logits = model(x, batch.domain)
        logits.sum().backward()
        for k in ("x1", "x2", "x3"):
            grad = x[k].grad
            assert grad is not None and bool((grad != 0).any()), (name, backend, k)
        out[backend] = logits.detach()
        # Changing one row's numeric value changes that row's logit and no other.
        moved = dict(batch.features)
        moved["x2"] = batch.features["x2"].clone()
        moved["x2"][5] += 3.0
        with torch.no_grad():
            delta = model(moved, batch.domain) - model(batch.features, batch.domain)
        assert float(delta[5].abs()) > 0 and bool((delta[torch.arange(32) != 5] == 0).all())
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out["fast"], out["reference"], rtol=tol.rtol, atol=tol.atol)


def test_numeric_fields_are_checked(dataset: MultiDomainDataset) -> None:
    model = models.build("deepfm", dataset, tower_config=TOWER)
    batch = dataset.train.rows(torch.arange(4))
    missing = {k: v for k, v in batch.features.items() if k != "x1"}
    with pytest.raises(KeyError, match="numeric feature 'x1' missing"):
        model(missing, batch.domain)
    wrong = {**batch.features, "x1": batch.features["x1"].double()}
    with pytest.raises(ValueError, match=r"numeric feature 'x1' must be float32 \[B\]"):
        model(wrong, batch.domain)


def test_a_trained_model_uses_its_numeric_inputs() -> None:
    """Trained on data whose clicks depend on the numeric fields, the model loses AUC when those
    inputs are shuffled across rows: a numeric path that is wired but ignored (or zeroed) fails
    here. (Backend parity of whole runs with numeric fields: tests/test_example_clicklog.py.)"""
    ds = data.load("synthetic", preset="paper", rows=8000, num_domains=2, numeric_fields=2, numeric_scale=2.0)
    model = models.build("wdl", ds, "base", tower_config=TOWER, backend="fast")
    result = train.fit(model, ds, moefast.TrainConfig(max_epochs=2, batch_size=256, progress=False))
    wauc = result.metrics["test"]["wauc"]
    perm = torch.randperm(len(ds.test), generator=torch.Generator().manual_seed(0))
    shuffled = {k: (v[perm] if k.startswith("x") else v) for k, v in ds.test.features.items()}
    test = type(ds.test)(shuffled, ds.test.domain, ds.test.label)
    without = evaluate_scores(predict(model, test), test.label, test.domain, ds.domain_names).wauc
    # The generator's numeric effect (std 2 on the logit) is the largest single signal.
    assert wauc - without > 0.05, (wauc, without)


def test_the_command_line_draws_synthetic_numeric_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--numeric-fields`` / ``--numeric-scale`` reach the synthetic generator (recorded in the
    run's config.toml and dataset record), and are refused for a dataset they do not apply to."""
    from moefast import cli

    out = tmp_path / "run"
    flags = ["--rows", "1200", "--num-domains", "2", "--method", "base", "--max-epochs", "1", "--quiet"]
    assert cli.main(["train", *flags, "--numeric-fields", "2", "--numeric-scale", "0.5", "--out", str(out)]) == 0
    assert "numeric_fields = 2" in (out / "config.toml").read_text()
    assert json.loads((out / "dataset.json").read_text())["numeric"] == [{"name": "x1"}, {"name": "x2"}]
    capsys.readouterr()
    assert cli.main(["train", "--dataset", "movielens", "--data-dir", str(tmp_path), "--numeric-fields", "2"]) == 2
    assert "--numeric-fields applies to the synthetic dataset only" in capsys.readouterr().err
