"""A run directory belongs to one run: the marker, the lock, --overwrite and its limits (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moefast import cli, data, models
from moefast.cli import _options
from moefast.config import TrainConfig
from moefast.data.dataset import MultiDomainDataset
from moefast.runs.rundir import MARKER, RunDirectoryError, claim_run_dir
from moefast.train import fit

TINY = ["train", "--rows", "400", "--num-domains", "2", "--num-users", "40", "--num-items", "30",
        "--max-epochs", "1", "--batch-size", "256", "--method", "base", "--quiet"]


@pytest.fixture(scope="module")
def ds() -> MultiDomainDataset:
    return data.load("synthetic", preset="paper", rows=400, num_domains=2, num_users=40, num_items=30)


def _fit(ds: MultiDomainDataset, out: Path, **kwargs: bool) -> None:
    model = models.build("deepfm", ds, "base")
    fit(model, ds, TrainConfig(max_epochs=1, batch_size=256, progress=False), out_dir=out, **kwargs)


def test_claim_writes_the_marker_and_refuses_what_is_not_its_own(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with claim_run_dir(run) as claim:
        assert claim.owner
        marker = json.loads((run / MARKER).read_text())
        assert marker["format"] == 1 and marker["pid"] == os.getpid()
        (run / "metrics.json").write_text("{}")
    # A previous run: refused without overwrite, cleared with it (the marker stays).
    with pytest.raises(RunDirectoryError, match=r"holds a previous run.*--overwrite"):
        claim_run_dir(run)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "07_expert_9.pt").write_bytes(b"another plan")
    (run / ".metrics.json.tmp").write_text("half")
    with claim_run_dir(run, overwrite=True):
        assert sorted(os.listdir(run)) == [MARKER]
    # An arbitrary folder: never cleared, not even with overwrite.
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(RunDirectoryError, match="not a moefast run directory"):
            claim_run_dir(folder, overwrite=overwrite)
    assert sorted(os.listdir(folder)) == ["thesis.tex"]
    # A file, or a path under a file.
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="exists and is not a directory"):
        claim_run_dir(tmp_path / "file")
    with pytest.raises(RunDirectoryError, match="cannot be created"):
        claim_run_dir(tmp_path / "file" / "run")
    # A claim that wrote nothing leaves nothing behind.
    with claim_run_dir(tmp_path / "a" / "unused"):
        pass
    assert not (tmp_path / "a" / "unused").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(RunDirectoryError, match=r"cannot be created|not writable"):
            claim_run_dir(locked / "run")
    finally:
        locked.chmod(0o700)


def test_a_second_live_process_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = (
        "import sys\nfrom moefast.runs.rundir import RunDirectoryError, claim_run_dir\n"
        "try:\n    claim_run_dir(sys.argv[1], overwrite=True)\n"
        "except RunDirectoryError as exc:\n    print(exc)\n    sys.exit(3)\n"
    )
    with claim_run_dir(run):
        (run / "config.toml").write_text("")
        done = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True)
        assert done.returncode == 3 and "in use by another live moefast process" in done.stdout, done
        assert (run / "config.toml").exists(), "the live run's files were not cleared"
    # Released (the lock dies with its process or its release): the directory is usable again.
    done = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True)
    assert done.returncode == 0, done


def test_fit_refuses_a_used_directory_unless_overwrite(ds: MultiDomainDataset, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fit(ds, run)
    assert (run / MARKER).is_file() and (run / "metrics.json").is_file()
    (run / "checkpoints" / "05_gate.pt").write_bytes(b"stale, another plan")
    with pytest.raises(ValueError, match="holds a previous run"):
        _fit(ds, run)
    _fit(ds, run, overwrite=True)
    assert not (run / "checkpoints" / "05_gate.pt").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["00_joint.pt"]


def test_cli_out_is_checked_before_the_data_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(*_: object) -> None:
        raise AssertionError("the data loaded before --out was checked")

    monkeypatch.setattr(_options, "load_dataset", no_load)
    monkeypatch.setattr("moefast.cli.train.load_dataset", no_load)
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    for out, message in ((tmp_path / "file" / "run", "cannot be created"),
                         (tmp_path / "file", "exists and is not a directory"),
                         (folder, "is not a moefast run directory")):
        for extra in ([], ["--overwrite"]):
            assert cli.main([*TINY, "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("moefast: error: --out: ") and message in err, err
    assert (folder / "notes.txt").read_text() == "keep"


def test_cli_rerun_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main([*TINY, "--out", str(out)]) == 0
    (out / "old.tmp").write_text("a killed save")
    assert cli.main([*TINY, "--out", str(out)]) == 2
    assert "holds a previous run" in capsys.readouterr().err
    assert cli.main([*TINY, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "old.tmp").exists() and (out / "metrics.json").is_file() and (out / MARKER).is_file()


def test_resume_of_what_the_command_line_cannot_continue_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--resume`` of a folder that is no run, of a grid cell, of a run fit() wrote, of a run
    killed while its data loaded: one line each, pointing at what does continue it."""
    from moefast.experiments.grid import LOCK_FILE

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    cell = tmp_path / "grid" / "cells" / "synthetic" / "wdl" / "base" / "seed3"
    cell.mkdir(parents=True)
    (tmp_path / "grid" / LOCK_FILE).touch()
    python = tmp_path / "python"
    python.mkdir()
    loading = tmp_path / "loading"
    loading.mkdir()
    for run in (cell, python, loading):
        (run / MARKER).touch()
    for run in (cell, python):
        (run / "settings.json").write_text("{}")
    for run, message in ((folder, "not a moefast run directory (no .moefast-run)"),
                         (cell, "a cell of the moefast grid in "),
                         (python, "written by fit() (no config.toml): continue it in Python with fit("),
                         (loading, f"killed while its data loaded, before training began); start it again with "
                                   f"--out {loading}\n")):
        assert cli.main(["train", "--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert (folder / "notes.txt").read_text() == "keep"


def test_a_damaged_record_is_one_error_naming_its_file(tmp_path: Path) -> None:
    from moefast.runs.settings import check_settings

    path = tmp_path / "settings.json"
    check_settings(path, {"train": {"lr": 0.001}}, lambda keys: ", ".join(keys))
    check_settings(path, {"train": {"lr": 0.001}}, lambda keys: ", ".join(keys))
    with pytest.raises(ValueError, match=r"^train\.lr$"):
        check_settings(path, {"train": {"lr": 0.01}}, lambda keys: ", ".join(keys))
    for damaged, reason in ((b'{"train": {"lr"', "is damaged: .* at line 1"), (b"\xff\xfe", "is not utf-8 text")):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"settings record '.*settings\.json' {reason}"):
            check_settings(path, {"train": {"lr": 0.001}}, lambda keys: ", ".join(keys))


def test_a_run_inside_or_around_a_live_run_is_refused(tmp_path: Path) -> None:
    """A method's subdirectory of a live multi-method run, or the run around a live method's
    directory: claiming one (--overwrite least of all) would change the live run's files. The
    other process's lock is taken here on a file description of its own (flock locks conflict
    between descriptions, within a process too)."""
    import fcntl

    multi = tmp_path / "multi"
    with claim_run_dir(multi):
        (multi / "config.toml").write_text("")
    (multi / "base").mkdir()
    (multi / "base" / MARKER).touch()
    (multi / "base" / "metrics.json").write_text("{}")
    for held, claimed, overwrite in ((multi, multi / "base", True), (multi, multi / "mlora", False),
                                     (multi / "base", multi, True)):
        fd = os.open(held / MARKER, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the other, live process
            with pytest.raises(RunDirectoryError, match=rf"part of the run '{held}', in use by another live"):
                claim_run_dir(claimed, overwrite=overwrite)
        finally:
            os.close(fd)
    assert (multi / "base" / "metrics.json").exists() and (multi / "config.toml").exists()
    assert not (multi / "mlora").exists()  # refused before anything was created
    # This process's own claim around fit's is not another's.
    with claim_run_dir(multi, overwrite=True), claim_run_dir(multi / "base"):
        pass
