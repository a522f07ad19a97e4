"""The one settings record (issue 25): a run's, a grid's and a claims plan's record built by
``moefast.runs.settings.settings_record`` and compared by one function, and what was written
before it still read and accepted.

The records written before it are files recorded at commit de9c5e1 (before issue 25d's first
commit), not rebuilt here:

- ``docs/results/claims-settings.json`` and ``docs/results/claims-runs.csv``: the claims grid,
  still running from an older commit, keeps writing files of exactly this format;
- ``tests/data/pre-25d-grid.json``: ``grid.json`` of ``GridConfig(out=...)`` (backend ``null``);
- ``tests/data/pre-25d-run/``: ``tests/_resume_run.py``'s MoE-MLoRA run (lazy Adam) stopped by
  ``SIGTERM`` after its third stage, and ``tests/data/pre-25d-run.metrics.json`` the same run
  uninterrupted (one thread).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from moefast.experiments import claims, grid
from moefast.runs.settings import backend_name, check_settings, differing_keys, settings_record

sys.path.insert(0, str(Path(__file__).parent))
import _resume_run as tiny

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
RESULTS = ROOT / "docs" / "results"


def _refuse(keys: list[str]) -> str:
    return ", ".join(keys)


def test_the_committed_claims_record_and_csv_are_accepted_by_the_report(tmp_path: Path) -> None:
    """``moefast reproduce --report-only --out DIR`` on a copy of docs/results: the committed
    record compares equal to the plan's, the CSV reads, and the report is the committed one."""
    out = tmp_path / "results"
    out.mkdir()
    for name in ("claims-settings.json", "claims-runs.csv"):
        shutil.copy(RESULTS / name, out / name)
    config = claims.ClaimsConfig(out=str(out))
    check_settings(out / "claims-settings.json", config.settings(), _refuse, record=False)
    paths = claims.write_report(config)
    assert paths["claims.md"].read_text() == (RESULTS / "claims.md").read_text()
    # The record is compared, not only read: another fixed setting is refused.
    with pytest.raises(ValueError, match=r"other settings \(train\.lr;"):
        claims.write_report(_with_lr(config))


def _with_lr(config: claims.ClaimsConfig) -> claims.ClaimsConfig:
    """``config`` whose runs would train at another learning rate."""

    class Other(claims.ClaimsConfig):
        def train_config(self, **kwargs: Any) -> Any:
            import dataclasses

            return dataclasses.replace(super().train_config(**kwargs), lr=0.01)

    return Other(out=config.out)


def test_a_grid_record_written_before_is_accepted(tmp_path: Path) -> None:
    """The old grid recorded ``backend: null`` (the environment's, else auto); the new record
    names the backend. The same settings compare equal; another backend is refused."""
    shutil.copy(DATA / "pre-25d-grid.json", tmp_path / "grid.json")
    # Recorded when frozen-path dropout was on by default (issue 24 turned it off): the same
    # settings are the old value, given; the new default is another setting, and refused.
    train = dataclasses.replace(grid.GridConfig().train, frozen_path_dropout=True)
    config = grid.GridConfig(out=str(tmp_path), train=train)
    grid._check_settings(config)
    assert json.loads((tmp_path / "grid.json").read_text())["backend"] is None  # read, never rewritten
    with pytest.raises(ValueError, match=r"other settings \(backend\)"):
        grid._check_settings(grid.GridConfig(out=str(tmp_path), backend="reference", train=train))
    with pytest.raises(ValueError, match=r"other settings \(train.frozen_path_dropout\)"):
        grid._check_settings(grid.GridConfig(out=str(tmp_path)))


def test_backend_is_normalised_one_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOEFAST_BACKEND", raising=False)
    assert backend_name(None) == backend_name("auto") == backend_name(" Auto ") == "auto"
    monkeypatch.setenv("MOEFAST_BACKEND", "Reference")
    assert backend_name(None) == "reference"
    assert differing_keys({"backend": None}, {"backend": "reference"}) == []
    assert differing_keys({"backend": "Reference"}, {"backend": "reference"}) == []
    assert differing_keys({"backend": "fast"}, {"backend": "reference"}) == ["backend"]


def test_one_builder_leaves_out_what_changes_no_result() -> None:
    from moefast.config import TrainConfig

    record = settings_record(TrainConfig(progress=False), "fast", omit=("seed",), tower={"dropout": 0.5})
    assert record["backend"] == "fast" and record["tower"] == {"dropout": 0.5}
    assert "progress" not in record["train"] and "seed" not in record["train"]
    assert record == settings_record(TrainConfig(progress=True), "fast", omit=("seed",), tower={"dropout": 0.5})


def test_a_run_directory_written_before_resumes_to_the_uninterrupted_run(tmp_path: Path) -> None:
    """The run directory the pre-change code left (stopped after three of its stages) resumes
    under this code, its ``settings.json`` accepted, and ends as the uninterrupted run did."""
    run = tmp_path / "run"
    shutil.copytree(DATA / "pre-25d-run", run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Recorded when frozen-path dropout was on by default (issue 24 turned it off).
        result = tiny.run(run, "lazy-adam", resume=True, frozen_path_dropout=True)
    finally:
        torch.set_num_threads(threads)
    expected = json.loads((DATA / "pre-25d-run.metrics.json").read_text())
    got = json.loads(json.dumps(result.metrics))
    for key in ("train_samples_per_second",):
        expected.pop(key), got.pop(key)
    for side in (expected, got):
        for stage in side["stages"]:
            for key in ("seconds", "train_seconds"):
                stage.pop(key, None)
    assert got == expected
