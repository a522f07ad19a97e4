"""``moefast grid`` end to end on a tiny setting, including resuming after an interruption."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from moefast import log
from moefast.config import DataConfig, TowerConfig, TowerKind, TrainConfig
from moefast.experiments import grid as grid_module
from moefast.experiments.grid import DONE_FILE, GridConfig, data_label, plan_grid, run_grid
from moefast.runs.rundir import RunDirectoryError, claim_run_dir, hold_lock
from moefast.runs.snapshot import SNAPSHOT, Preempted

TINY_DATA = (DataConfig(preset="paper", rows=600, num_domains=2, diversity=0.9, data_seed=5),)


class _Lines(logging.Handler):
    """The messages of the channel, as said."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def tiny_grid(out: Path) -> GridConfig:
    return GridConfig(
        data=TINY_DATA, models=("wdl",), experts_per_domain=(1,), seeds=(1, 2),
        train=TrainConfig(max_epochs=1, batch_size=256, progress=False), out=str(out),
        tower=TowerConfig(hidden_units=(16, 8), ranks=(2, 1)),
    )


class Interrupted(RuntimeError):
    pass


@pytest.mark.slow  # among the slowest tests (--durations): selection only, make test runs it
def test_grid_runs_resumes_and_tabulates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_grid(tmp_path / "grid")
    cells = plan_grid(config)
    # 1 data setting x 1 backbone x (base, mlora, moe-mlora k=1) x 2 seeds
    assert len(cells) == 6
    assert len({c.directory(Path(config.out)) for c in cells}) == 6

    real_fit = grid_module_fit()
    calls: list[str] = []

    def flaky_fit(model: torch.nn.Module, dataset: object, train: TrainConfig, **kwargs: object) -> object:
        calls.append(f"{dataset.name}/{model.tower.kind.value}/{train.seed}")  # type: ignore[attr-defined]
        if len(calls) == 4:
            # What a fit killed in its first epoch leaves: its claimed directory (marker) with the
            # temporary file of a write it never renamed.
            with claim_run_dir(Path(str(kwargs["out_dir"]))) as claim:
                (claim.path / ".partial.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
            raise Interrupted("simulated interruption in the fourth cell")
        return real_fit(model, dataset, train, **kwargs)

    monkeypatch.setattr("moefast.train.loop.fit", flaky_fit)
    with pytest.raises(Interrupted):
        run_grid(config)
    out = Path(config.out)
    done = [c for c in cells if (c.directory(out) / DONE_FILE).exists()]
    assert done == cells[:3]
    broken = cells[3].directory(out)
    assert broken.exists() and not (broken / DONE_FILE).exists()  # a partial run directory
    stamps = {c: (c.directory(out) / DONE_FILE).stat().st_mtime_ns for c in done}

    calls.clear()
    monkeypatch.setattr("moefast.train.loop.fit", real_fit)
    counted: list[int] = []

    def counting_fit(*args: object, **kwargs: object) -> object:
        counted.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr("moefast.train.loop.fit", counting_fit)
    paths = run_grid(config)
    assert len(counted) == 6 - 3  # the finished cells are not run again
    assert not (broken / ".partial.pt.x1y2.tmp").exists() and (broken / DONE_FILE).exists()  # started over
    assert all((c.directory(out) / DONE_FILE).stat().st_mtime_ns == stamps[c] for c in done)

    runs = pd.read_csv(paths["runs.csv"])
    assert len(runs) == 6
    table = pd.read_csv(paths["results.csv"])
    assert len(table) == 3 and set(table["seeds"]) == {2}
    for row in table.itertuples():
        group = runs[(runs["data"] == row.data) & (runs["method_label"] == row.method)]["wauc"]
        assert row.wauc_mean == pytest.approx(group.mean())
        assert row.wauc_std == pytest.approx(group.std(ddof=1))
        mlora = table[(table["data"] == row.data) & (table["method"] == "mlora")]["wauc_mean"].item()
        if row.method.startswith("moe-mlora"):
            assert row.delta_vs_mlora == pytest.approx(row.wauc_mean - mlora)
        else:
            assert math.isnan(row.delta_vs_mlora)
    markdown = paths["results.md"].read_text()
    for data in TINY_DATA:
        assert f"## {data_label(data)}" in markdown
    assert "| wdl |" in markdown and "Δ k1" in markdown
    assert paths["results.png"].stat().st_size > 0

    # Resuming with other training settings would mix differently trained cells.
    with pytest.raises(ValueError, match=r"other settings \(train\.max_epochs\)"):
        run_grid(dataclasses.replace(config, train=dataclasses.replace(config.train, max_epochs=2)))


def test_a_killed_cell_resumes_and_other_data_or_a_second_grid_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise equality holds at a fixed thread count
    try:
        config = dataclasses.replace(
            tiny_grid(tmp_path / "grid"), methods=(TowerKind.MLORA,), seeds=(1,),
            train=TrainConfig(max_epochs=2, patience=2, batch_size=128, progress=False))
        whole = dataclasses.replace(config, out=str(tmp_path / "whole"))
        run_grid(whole)
        # The cell is stopped (SIGTERM, as a scheduler would) in its second epoch: rerunning the
        # grid continues it from its first, not from scratch, and ends where the whole run did.
        monkeypatch.setenv("MOEFAST_TEST_FAULT", "term:step:0:2:1")
        with pytest.raises(Preempted, match="continue it with the same moefast grid command"):
            run_grid(config)
        monkeypatch.delenv("MOEFAST_TEST_FAULT")
        (cell,) = plan_grid(config)
        snapshot = torch.load(cell.directory(Path(config.out)) / SNAPSHOT, weights_only=True)
        assert snapshot["stage"]["epochs"] == 1 and snapshot["stage"]["batches"] == 1
        said = _Lines()  # the grid's lines come through the logging channel (moefast.log)
        log.LOGGER.addHandler(said)
        level = log.LOGGER.level
        log.LOGGER.setLevel(logging.INFO)
        try:
            run_grid(config)
        finally:
            log.LOGGER.removeHandler(said)
            log.LOGGER.setLevel(level)
        assert any(line.endswith("(resumed)") for line in said.lines)
        done = json.loads((cell.directory(Path(config.out)) / DONE_FILE).read_text())
        reference = json.loads((cell.directory(Path(whole.out)) / DONE_FILE).read_text())
        assert {k: done[k] for k in ("wauc", "mean_auc", "logloss")} == {
            k: reference[k] for k in ("wauc", "mean_auc", "logloss")}
    finally:
        torch.set_num_threads(threads)
    # The same setting label over other data (another --data-dir, other files) is refused.
    other = dataclasses.replace(config, seeds=(1, 2))
    with pytest.raises(ValueError, match="trained on other data"):
        run_grid(other, load=lambda d: grid_module.load_data(dataclasses.replace(d, data_seed=6)))
    # A second live grid on the directory is refused.
    with hold_lock(Path(config.out) / grid_module.LOCK_FILE, "test"), pytest.raises(
            RunDirectoryError, match="in use by another live moefast process"):
        run_grid(other)
    # A killed write's temporary file is removed by the next run.
    stale = Path(config.out) / ".results.csv.k1ll3d.tmp"
    stale.write_text("half a table")
    run_grid(config)
    assert not stale.exists()
    # A damaged record of the grid is one error naming it, never a JSON traceback.
    data_record = Path(config.out) / grid_module.DATA_FILE
    data_record.write_text(data_record.read_text()[:-5])
    with pytest.raises(ValueError, match=r"grid data record '.*data\.json' is damaged"):
        run_grid(other)


def test_the_data_record_of_an_older_grid_is_read_grown_and_compared(tmp_path: Path) -> None:
    """``data.json`` goes through the one settings comparison: a record written by an older grid
    (``write_json``'s layout, two spaces, unsorted) is read as it is, a new data setting is added
    to it, and a known one over other data is refused."""
    from moefast.runs.settings import dataset_fingerprint

    paper = DataConfig(dataset="synthetic", preset="paper", rows=200, num_domains=2)
    other = dataclasses.replace(paper, rows=240)
    loaded = {d: grid_module.load_data(d) for d in (paper, other)}
    path = tmp_path / grid_module.DATA_FILE
    path.write_text(json.dumps({"z-old": "0" * 64, data_label(paper): dataset_fingerprint(loaded[paper])},
                               indent=2) + "\n")
    grid_module._check_data(tmp_path, paper, loaded[paper])  # the same data: accepted, nothing added
    grid_module._check_data(tmp_path, other, loaded[other])  # a new setting: added beside the old ones
    assert set(json.loads(path.read_text())) == {"z-old", data_label(paper), data_label(other)}
    with pytest.raises(ValueError, match=rf"data setting '{data_label(paper)}' trained on other data"):
        grid_module._check_data(tmp_path, paper, loaded[other])


def grid_module_fit() -> object:
    """The real ``fit`` (run_grid looks it up in ``moefast.train.loop`` at call time)."""
    from moefast.train.loop import fit

    return fit


def test_grid_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        run_grid(GridConfig(models=("nope",), out=str(tmp_path)))
    with pytest.raises(ValueError, match="experts_per_domain must be >= 1"):
        GridConfig(experts_per_domain=(0,))
    with pytest.raises(ValueError, match="seeds has duplicates"):
        GridConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="synthetic dataset only"):
        grid_module.load_data(DataConfig(dataset="movielens-1m", diversity=0.5))


def test_methods_without_moe_have_one_cell_each() -> None:
    config = GridConfig(models=("deepfm", "nfm"), methods=(TowerKind.BASE, TowerKind.MLORA), seeds=(3,))
    assert [(c.model, c.method_label) for c in plan_grid(config)] == [
        ("deepfm", "base"), ("deepfm", "mlora"), ("nfm", "base"), ("nfm", "mlora"),
    ]


def test_grid_command_line_and_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moefast.cli import main
    from moefast.cli.grid import resolve_grid

    toml = tmp_path / "grid.toml"
    toml.write_text('model = ["wdl"]\nmethod = "base"\nseeds = [3]\nrows = 400\nnum-domains = 2\n'
                    "max-epochs = 1\nbatch-size = 256\n")
    out = tmp_path / "grid"
    assert main(["grid", "--config", str(toml), "--diversity", "0.9,0.1", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## synthetic_preset-taobao_rows-400_num-domains-2_diversity-0.9" in printed and "| wdl |" in printed  # the default preset is named
    assert len(pd.read_csv(out / "runs.csv")) == 2  # two diversities x base

    config, quiet = resolve_grid({"model": ("nfm",), "experts_per_domain": (2, 4), "seeds_compat": True,
                                  "dataset": ("movielens-1m",), "domain": ("gender", "age"), "data_dir": "x"})
    assert quiet is False and config.train.seeds_compat and config.experts_per_domain == (2, 4)
    assert [(d.dataset, d.domain, d.data_dir) for d in config.data] == [
        ("movielens-1m", "gender", "x"), ("movielens-1m", "age", "x"),
    ]

    assert main(["grid", "--model", "nope", "--out", str(out)]) == 2
    assert "moefast: error: unknown model 'nope'" in capsys.readouterr().err
