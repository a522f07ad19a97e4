"""``moefast predict`` and ``moefast export`` on a run directory.

One tiny MoE-MLoRA run (3 domains, 1 epoch) is trained through the command line; ``predict`` on
its directory must reproduce the run's ``predictions.csv`` (bitwise with ``--unmerged``, within
fp32 rounding with the merged model), and the exported program must score like the merged model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from moefast import cli
from moefast.cli._options import UserError
from moefast.cli.predict import check_compatible, domain_ids
from moefast.data import load
from moefast.export import dataset_record, method_dir

TINY = ["--preset", "paper", "--rows", "1500", "--num-domains", "3", "--num-users", "100",
        "--num-items", "50"]
# Probabilities from the merged model against the trained one's (fp32 logits, rounded differently).
MERGED_ATOL = 1e-6

# Small shapes gain nothing from a second thread; on a loaded 2-core machine the hand-offs cost
# up to 30x the work (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    argv = ["train", *TINY, "--method", "moe-mlora", "--max-epochs", "1", "--batch-size", "256",
            "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    return out


def test_predict_reproduces_the_runs_test_predictions(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recorded = pd.read_csv(run_dir / "predictions.csv")
    assert cli.main(["predict", "--model", str(run_dir), "--unmerged", "--out", str(tmp_path / "a.csv")]) == 0
    err = capsys.readouterr().err
    assert "scoring split 'test'" in err and "data: the run's own" in err
    exact = pd.read_csv(tmp_path / "a.csv")
    assert list(exact.columns) == ["row", "domain", "domain_name", "label", "logit", "score"]
    pd.testing.assert_frame_equal(exact[["domain", "label", "score"]], recorded, check_exact=True)

    # The same data given as flags, batches that do not divide the split, Parquet out.
    out = tmp_path / "b.parquet"
    assert cli.main(["predict", "--model", str(run_dir), *TINY, "--batch-size", "37", "--quiet",
                     "--out", str(out)]) == 0
    merged = pd.read_parquet(out)
    assert (merged["domain"] == recorded["domain"]).all() and (merged["label"] == recorded["label"]).all()
    assert (merged["score"] - recorded["score"]).abs().max() <= MERGED_ATOL
    assert (merged["domain_name"] == [f"domain{d}" for d in recorded["domain"]]).all()


def test_the_exported_program_scores_like_the_merged_model(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    program = tmp_path / "model.pt2"
    assert cli.main(["export", str(run_dir), "--out", str(program), "--quiet"]) == 0
    meta = json.loads((tmp_path / "model.pt2.json").read_text())
    assert meta["data_options"]["num_domains"] == 3 and meta["model"] == "deepfm"
    assert (tmp_path / "model.preprocessing" / "dataset.json").is_file()
    for model, name in ((program, "p.csv"), (run_dir, "m.csv")):
        assert cli.main(["predict", "--model", str(model), "--split", "val", "--out", str(tmp_path / name)]) == 0
        assert "scoring split 'val'" in capsys.readouterr().err
    from_program, from_merged = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "m.csv")
    assert len(from_program) == len(from_merged) > 0
    assert (from_program[["row", "domain", "label"]] == from_merged[["row", "domain", "label"]]).all().all()
    assert (from_program["score"] - from_merged["score"]).abs().max() <= MERGED_ATOL


@pytest.mark.parametrize(("argv", "message"), [
    (["--out", "scores.txt"], "written as .csv or .parquet"),
    (["--out", "s.csv", "--num-domains", "4"], "does not have the model's fields"),
    (["--out", "s.csv", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_user_mistakes_are_one_line(
    run_dir: Path, tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a if not a.startswith("s") or "." not in a else str(tmp_path / a) for a in argv]
    if "--num-domains" in argv:
        argv += TINY[:2]
    assert cli.main(["predict", "--model", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moefast: error:") and message in err and len(err.strip().splitlines()) == 1, err


def test_an_unknown_domain_is_a_clear_error() -> None:
    dataset = load("synthetic", preset="paper", rows=300, num_domains=3, num_users=20, num_items=10)
    record = dataset_record(dataset)
    assert domain_ids(record, dataset, torch.tensor([0, 2])).tolist() == [0, 2]
    renamed = dataclasses.replace(dataset, domain_names=("domain2", "domain0", "elsewhere"))
    with pytest.raises(UserError, match=r"domain 'elsewhere' \(id 2 in 'synthetic-paper'\) is unknown to the model"):
        domain_ids(record, renamed, torch.tensor([0, 2]))
    with pytest.raises(UserError, match="numbers its domains"):  # the same names in another order
        domain_ids(record, renamed, torch.tensor([0, 1]))


def test_ids_numbered_from_other_files_are_refused() -> None:
    """A real-format loader's ids mean the same raw values only for the same files."""
    dataset = load("synthetic", preset="paper", rows=300, num_domains=3, num_users=20, num_items=10)
    trained = dataclasses.replace(dataset, info={"source": "movielens-1m", "cache": {"key": "aaa"}})
    record = dataset_record(trained)
    assert record["source"] == {"name": "movielens-1m", "id_map": "fingerprint", "fingerprint": "aaa",
                                "vocabulary": None}
    check_compatible(record, trained)
    other = dataclasses.replace(dataset, info={"source": "movielens-1m", "cache": {"key": "bbb"}})
    with pytest.raises(UserError, match="numbers users and items from the files it reads"):
        check_compatible(record, other)
    with pytest.raises(UserError, match="trained on source 'movielens-1m', the data is 'synthetic'"):
        check_compatible(record, dataset)


@pytest.mark.parametrize("record", ["settings.json", "config.json"], ids=["settings", "older-config-json"])
def test_a_run_of_several_methods_needs_one_named(tmp_path: Path, record: str) -> None:
    for method in ("base", "mlora"):
        (tmp_path / method).mkdir()
        payload = {"model": {"name": "deepfm", "tower": {"kind": method}}} if record == "settings.json" else \
            {"model": "deepfm", "tower": {"kind": method}}
        (tmp_path / method / record).write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"several methods \(base, mlora\); choose one with --method"):
        method_dir(tmp_path)
    assert method_dir(tmp_path, "mlora") == tmp_path / "mlora"
    with pytest.raises(ValueError, match="has no method 'moe-mlora'"):
        method_dir(tmp_path, "moe-mlora")
    with pytest.raises(ValueError, match="holds method 'base', not 'mlora'"):
        method_dir(tmp_path / "base", "mlora")
