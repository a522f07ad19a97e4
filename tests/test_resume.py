"""Resume after a kill (issue 15): a training process killed anywhere (SIGKILL inside an epoch,
during a checkpoint or snapshot write, at a random time), stopped by SIGTERM, or failing a write
on a full disk, then resumed, ends bitwise equal to the uninterrupted run at one thread:
metrics.json but for its timing keys, predictions byte for byte, every checkpoint tensor.

The killed runs are forked children of the test process (real processes, killed by a real
SIGKILL): a fresh interpreter would spend seconds importing torch before training began.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moefast import _version as moefast_version
from moefast import cli, data, models
from moefast.runs import snapshot as resume
from moefast.runs import writer as atomic
from moefast.runs.checkpoint import load_checkpoint, read_checkpoint
from moefast.runs.snapshot import SNAPSHOT, Preempted
from moefast.runs.writer import FAULT_ENV, WriteError
from moefast.train import fit, loop

sys.path.insert(0, str(Path(__file__).parent))
import _resume_run as tiny

TIMING = ("train_samples_per_second",)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Bitwise equality holds at a fixed thread count; fault counters start fresh per test."""
    monkeypatch.setattr(atomic, "_WRITES", {})
    monkeypatch.delenv(FAULT_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted runs, one per embedding optimizer the tests resume."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("reference")
    runs = {"lazy-adam": base / "lazy-adam", "rowwise-adagrad": base / "rowwise-adagrad"}
    tiny.run(runs["lazy-adam"], "lazy-adam")
    tiny.run(runs["rowwise-adagrad"], "rowwise-adagrad", seeds_compat=True)
    torch.set_num_threads(threads)
    return runs


def _metrics(run: Path) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text())
    for key in TIMING:
        metrics.pop(key)
    for stage in metrics.get("stages", []):
        stage.pop("seconds")
    return metrics


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    assert _metrics(resumed) == _metrics(uninterrupted)
    assert (resumed / "predictions.csv").read_bytes() == (uninterrupted / "predictions.csv").read_bytes()
    names = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert names and sorted(p.name for p in (resumed / "checkpoints").iterdir()) == names
    for name in names:  # reassembled (a stage's checkpoint stores what it changed, issue 25)
        mine = read_checkpoint(resumed / "checkpoints" / name)
        theirs = read_checkpoint(uninterrupted / "checkpoints" / name)
        assert mine["meta"] == theirs["meta"]
        assert mine["state_dict"].keys() == theirs["state_dict"].keys()
        for key, tensor in theirs["state_dict"].items():
            assert torch.equal(mine["state_dict"][key], tensor), f"{name}: {key} differs"


_in_child = tiny.in_child


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _temporaries(run: Path) -> list[str]:
    return [p.name for p in run.rglob(".*.tmp")]


@pytest.mark.slow  # among the slowest tests (--durations): selection only, make test runs it
def test_killed_anywhere_and_resumed_again_and_again_ends_bitwise_the_same(
    tmp_path: Path, reference: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    run = tmp_path / "run"
    # Killed inside epoch 2 of the first expert's stage, after its batch 1.
    assert _killed(_in_child(lambda: tiny.run(run, "lazy-adam"), "kill:step:1:2:1"))
    assert (run / SNAPSHOT).is_file() and [p.name for p in (run / "checkpoints").iterdir()] == ["00_backbone.pt"]
    # Resumed (its first snapshot is inside that stage), and killed during the write of the
    # second expert's checkpoint (after the temporary file is complete, before the rename):
    # nothing under the final name.
    status = _in_child(lambda: tiny.run(run, "lazy-adam", resume=True), "kill:write:02_expert_1.pt")
    assert _killed(status)
    assert not (run / "checkpoints" / "02_expert_1.pt").exists() and _temporaries(run)
    # Resumed, and killed while writing its second resume snapshot.
    assert _killed(_in_child(lambda: tiny.run(run, "lazy-adam", resume=True), "kill:write:resume.pt:2"))
    # Resumed, and killed at a random time (whatever point it reached), seeded by the test's id:
    # the same test kills at the same delay on every run (the time the run reached may differ).
    delay = random.Random(zlib.crc32(request.node.nodeid.encode())).uniform(0.05, 0.8)
    print(f"random kill after {delay:.3f} s")
    _in_child(lambda: tiny.run(run, "lazy-adam", resume=True), None, kill_after=delay)
    tiny.run(run, "lazy-adam", resume=True)
    assert not _temporaries(run)
    assert_same_run(run, reference["lazy-adam"])
    # A finished run resumed again only rewrites the same outputs.
    tiny.run(run, "lazy-adam", resume=True)
    assert_same_run(run, reference["lazy-adam"])


def test_rowwise_adagrad_under_seeds_compat_resumes_mid_stage(tmp_path: Path, reference: dict[str, Path]) -> None:
    """Row-wise Adagrad's state, the best weights carried across stages, the weights reverted
    after an epoch without improvement and the Adam state carried across stages (seeds_compat)
    all survive a kill in the backbone stage's second epoch, then one in the first expert's
    first epoch (whose last snapshot is the backbone stage's end)."""
    run = tmp_path / "run"
    status = _in_child(lambda: tiny.run(run, "rowwise-adagrad", seeds_compat=True), "kill:step:0:2:1")
    assert _killed(status)
    status = _in_child(lambda: tiny.run(run, "rowwise-adagrad", resume=True, seeds_compat=True), "kill:step:1:1:1")
    assert _killed(status)
    tiny.run(run, "rowwise-adagrad", resume=True, seeds_compat=True)
    assert_same_run(run, reference["rowwise-adagrad"])


CLI_FLAGS = ["train", "--rows", "600", "--num-domains", "2", "--num-users", "40", "--num-items", "30",
             "--max-epochs", "2", "--batch-size", "128", "--method", "base,moe-mlora", "--quiet",
             "--embedding-optimizer", "lazy-adam", "--backend", "fast", "--seed", "3"]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted two-method command-line run, at one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    whole = tmp_path_factory.mktemp("cli") / "whole"
    assert cli.main([*CLI_FLAGS, "--out", str(whole)]) == 0
    torch.set_num_threads(threads)
    return whole


def test_a_moefast_train_process_killed_mid_epoch_resumes_from_the_command_line(
    tmp_path: Path, cli_reference: Path
) -> None:
    """A fresh interpreter running ``python -m moefast train``, SIGKILLed inside the first
    method's second epoch; ``moefast train --resume`` finishes both methods."""
    run = tmp_path / "run"
    env = {**os.environ, FAULT_ENV: "kill:step:0:2:1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "moefast", *CLI_FLAGS, "--out", str(run)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (run / "base" / SNAPSHOT).is_file() and not (run / "moe-mlora").exists()
    assert cli.main(["train", "--resume", str(run)]) == 0
    for method in ("base", "moe-mlora"):
        assert_same_run(run / method, cli_reference / method)


def test_sigterm_stops_at_a_step_and_the_cli_resumes_each_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cli_reference: Path
) -> None:
    flags = CLI_FLAGS
    # SIGTERM (a scheduler's preemption) in the second method's expert_1 stage, epoch 1, batch 1.
    monkeypatch.setenv(FAULT_ENV, "term:step:2:1:1")
    run = tmp_path / "run"
    assert cli.main([*flags, "--out", str(run)]) == resume.PREEMPTED_STATUS
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at [3/4] expert_1 epoch 1, batch 1 of method moe-mlora" in err
    assert f"continue it with moefast train --resume {run}\n" in err  # the run, not run/moe-mlora
    snapshot = torch.load(run / "moe-mlora" / SNAPSHOT, weights_only=True)
    assert (snapshot["stage"]["label"], snapshot["stage"]["batches"]) == ("expert_1", 1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    monkeypatch.delenv(FAULT_ENV)
    # Flags that differ from the recorded ones are refused, naming each key.
    assert cli.main(["train", "--resume", str(run), "--lr", "0.01", "--max-epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "train.max_epochs" in err and "differ" in err
    assert cli.main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    # The same flags, or none, continue it.
    assert cli.main(["train", "--resume", str(run), "--quiet", "--max-epochs", "2"]) == 0
    for method in ("base", "moe-mlora"):
        assert_same_run(run / method, cli_reference / method)
    assert (run / "table.txt").read_text() != ""


def test_a_full_disk_leaves_no_partial_file_and_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    reference: dict[str, Path],
) -> None:
    run = tmp_path / "run"
    # The second snapshot write fails part-way: the first snapshot stays whole, no temporary file.
    monkeypatch.setenv(FAULT_ENV, "enospc:write:resume.pt:2")
    with pytest.raises(WriteError, match=r"resume\.pt.*No space left on device.*nothing was written"):
        tiny.run(run, "lazy-adam")
    assert not _temporaries(run)
    first = torch.load(run / SNAPSHOT, weights_only=True)
    assert first["stage"]["epochs"] == 1
    # A checkpoint write fails the same way.
    monkeypatch.setattr(atomic, "_WRITES", {})
    monkeypatch.setenv(FAULT_ENV, "enospc:write:01_expert_0.pt")
    with pytest.raises(WriteError, match=r"01_expert_0\.pt"):
        tiny.run(run, "lazy-adam", resume=True)
    assert not (run / "checkpoints" / "01_expert_0.pt").exists() and not _temporaries(run)
    monkeypatch.delenv(FAULT_ENV)
    tiny.run(run, "lazy-adam", resume=True)
    assert_same_run(run, reference["lazy-adam"])
    # On the command line: one line, status 1, and metrics.json absent rather than half written.
    flags = ["train", "--rows", "300", "--num-domains", "2", "--num-users", "30", "--num-items", "20",
             "--max-epochs", "1", "--method", "base", "--quiet", "--out", str(tmp_path / "cli")]
    monkeypatch.setattr(atomic, "_WRITES", {})
    monkeypatch.setenv(FAULT_ENV, "enospc:write:metrics.json")
    assert cli.main(flags) == 1
    # The stage capped at one epoch says so first (one warning line); then the error, one line.
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("moefast: warning: stage ")]
    assert len(lines) == 1 and lines[0].startswith("moefast: error: cannot write") and "metrics.json" in lines[0]
    assert not (tmp_path / "cli" / "metrics.json").exists() and not _temporaries(tmp_path / "cli")


def test_a_resume_with_other_settings_or_another_version_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    assert _killed(_in_child(lambda: tiny.run(run, "lazy-adam"), "kill:step:0:2:1"))
    with pytest.raises(ValueError, match=r"other settings \(train\.lr, train\.patience;"):
        tiny.run(run, "lazy-adam", resume=True, lr=0.01, patience=2)
    ds = tiny.dataset()
    with pytest.raises(ValueError, match=r"other settings \(model\.initial_state;"):
        fit(models.build("deepfm", ds, "moe-mlora", seed=8), ds, tiny.config("lazy-adam"), backend="fast",
            out_dir=run, resume=True)
    other = data.load("synthetic", preset="paper", rows=600, num_domains=2, num_users=40, num_items=30, seed=5)
    with pytest.raises(ValueError, match=r"other settings \(dataset\.fingerprint;"):
        fit(models.build("deepfm", other, "moe-mlora", seed=7), other, tiny.config("lazy-adam"), backend="fast",
            out_dir=run, resume=True)
    current = moefast_version.__version__
    monkeypatch.setattr(moefast_version, "__version__", "0.0.0-other")
    with pytest.raises(ValueError, match=r"written by moefast .*, this is moefast 0\.0\.0-other"):
        tiny.run(run, "lazy-adam", resume=True)
    monkeypatch.setattr(moefast_version, "__version__", current)
    # Another torch: warned about (the arithmetic may differ), not refused.
    real = torch.__version__
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    with pytest.warns(UserWarning, match=r"written under torch .*, this is torch 0\.0\.0-other"):
        assert resume.load_snapshot(run) is not None
    monkeypatch.setattr(torch, "__version__", real)
    # Another thread count: warned about (bitwise equality holds at a fixed one).
    torch.set_num_threads(2)
    with pytest.warns(UserWarning, match=r"written with 1 threads, this process uses 2"):
        resume.load_snapshot(run)
    torch.set_num_threads(1)
    # A snapshot of an earlier format (development builds share a version number).
    kept = (run / SNAPSHOT).read_bytes()
    torch.save({**torch.load(run / SNAPSHOT, weights_only=True), "format": resume.SNAPSHOT_FORMAT - 1}, run / SNAPSHOT)
    with pytest.raises(ValueError, match=rf"snapshot of format {resume.SNAPSHOT_FORMAT - 1}, this moefast reads"):
        tiny.run(run, "lazy-adam", resume=True)
    (run / SNAPSHOT).write_bytes(kept)
    # Results without a snapshot (a run finished by a moefast without resume): nothing to resume.
    (run / SNAPSHOT).unlink()
    (run / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a run's results but no resume snapshot"):
        tiny.run(run, "lazy-adam", resume=True)
    # Without out_dir there is nothing to resume.
    with pytest.raises(ValueError, match="needs an out_dir"):
        fit(models.build("deepfm", ds, "base"), ds, tiny.config("lazy-adam"), resume=True)


def test_preempted_names_the_run_and_how_to_continue() -> None:
    exc = Preempted(Path("runs/x"), "at [1/1] joint epoch 2, batch 3")
    assert "moefast train --resume runs/x" in str(exc)


def test_an_interrupted_or_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Ctrl-C or a full disk in the middle of a write leaves: the previous content, no
    temporary file."""
    path = tmp_path / "resume.pt"
    atomic.atomic_write(path, lambda handle: handle.write(b"the previous snapshot"))

    def interrupted(handle: Any) -> None:
        handle.write(b"half of the next")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(path, interrupted)
    monkeypatch.setenv(FAULT_ENV, "enospc:write:resume.pt:3")
    with pytest.raises(WriteError, match="No space left on device") as failed:
        atomic.atomic_write(path, lambda handle: torch.save({"w": torch.zeros(1000)}, handle))
    assert failed.value.errno == 28  # ENOSPC, though torch.save reported a RuntimeError
    assert path.read_bytes() == b"the previous snapshot" and os.listdir(tmp_path) == ["resume.pt"]
    monkeypatch.setenv(FAULT_ENV, "kill:write:resume.pt:second")
    with pytest.raises(ValueError, match=r"MOEFAST_TEST_FAULT='kill:write:resume\.pt:second'"):
        atomic.atomic_write(path, lambda handle: handle.write(b"x"))
    monkeypatch.delenv(FAULT_ENV)
    # The final file has the mode a plain open() gives (mkstemp's 0600 would hide a run's results
    # from the group that shares its directory).
    umask = os.umask(0o027)
    try:
        atomic.atomic_write(path, lambda handle: handle.write(b"x"))
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_every_output_is_written_atomically_a_full_disk_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plots, the grid's tables and the command line's config.toml and table.txt too: a full
    disk is a WriteError (one line, status 1), never a traceback or a half-written file."""
    import matplotlib

    from moefast.runs.rundir import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0.0, 1.0])
    monkeypatch.setenv(FAULT_ENV, "enospc:write:val_auc.png")
    with pytest.raises(WriteError, match=r"val_auc\.png"):
        save_figure(fig, tmp_path / "val_auc.png")
    plt.close(fig)
    assert os.listdir(tmp_path) == []
    flags = ["train", "--rows", "300", "--num-domains", "2", "--num-users", "30", "--num-items", "20",
             "--max-epochs", "1", "--method", "base", "--quiet"]
    for name in ("config.toml", "table.txt"):
        monkeypatch.setattr(atomic, "_WRITES", {})
        monkeypatch.setenv(FAULT_ENV, f"enospc:write:{name}")
        out = tmp_path / name.replace(".", "-")
        assert cli.main([*flags, "--out", str(out)]) == 1
        # One error line (a one-epoch stage's CapWarning line may come before it).
        lines = [line for line in capsys.readouterr().err.strip().splitlines()
                 if not line.startswith("moefast: warning: stage ")]
        assert len(lines) == 1 and lines[0].startswith("moefast: error: cannot write") and name in lines[0]
        assert not (out / name).exists() and not _temporaries(out)
    # The writers moved onto the one writer (issue 25): the data's vocab.json and cache, the
    # dataset record, predict's scores, a path-only writer (the exported program's), a copied
    # file, a table written batch by batch (Parquet and CSV) and the claims table.
    import pyarrow as pa

    from moefast.cli.predict import _write_scores
    from moefast.data import cache
    from moefast.data.vocab import write_vocab
    from moefast.experiments.claims import KEY_COLUMNS, _append_row
    from moefast.runs.records import write_dataset_record
    from moefast.runs.writer import copy_file, write_at_path, write_batches

    dataset = data.load("synthetic", preset="paper", rows=200, num_domains=2, num_users=20, num_items=10)
    logits = torch.zeros(len(dataset.test))
    source = tmp_path / "source.bin"
    source.write_bytes(b"y" * 2000)
    batches = [pa.record_batch({"score": pa.array([float(i) for i in range(300)])})] * 2
    writes: dict[str, Callable[[Path], object]] = {
        "vocab.json": lambda path: write_vocab(path, {"categorical": {}}),
        "dataset.json": lambda path: write_dataset_record(path, dataset),
        "entry.npz": lambda path: cache.write(path, dataset),
        "scores.parquet": lambda path: _write_scores(path, dataset.test, dataset.test.domain, logits, ["a", "b"]),
        "model.pt2": lambda path: write_at_path(path, lambda tmp: tmp.write_bytes(b"x" * 1000)),
        "copied.bin": lambda path: copy_file(source, path),
        "batches.parquet": lambda path: write_batches(path, iter(batches)),
        "batches.csv": lambda path: write_batches(path, iter(batches)),
        "claims-runs.csv": lambda path: _append_row(path, {**dict.fromkeys(KEY_COLUMNS, "x"), "auc": 0.5}),
    }
    # The claims table's lock file stays beside it (it is the lock, never an output).
    locks = {"claims-runs.csv": [".claims-runs.csv.lock"]}
    for name, write in writes.items():
        monkeypatch.setattr(atomic, "_WRITES", {})
        monkeypatch.setenv(FAULT_ENV, f"enospc:write:{name}")
        folder = tmp_path / "library" / name
        with pytest.raises(WriteError, match=rf"^cannot write '.*{name}': No space left on device") as failed:
            write(folder / name)
        assert "\n" not in str(failed.value) and failed.value.errno == 28
        assert not (folder / name).exists() and not _temporaries(folder)
        assert sorted(p.name for p in folder.glob(".*")) == locks.get(name, [])


def test_a_replaced_checkpoint_or_a_lost_settings_record_is_refused_and_a_late_sigterm_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict[str, Path]
) -> None:
    """What a resume must not take on trust: every finished stage's checkpoint (each an output of
    the run, though only the last is loaded again), and the settings record (without it a resume
    with other options would go unnoticed). A SIGTERM after the last step boundary stops the run
    too, rather than being forgotten."""
    run = tmp_path / "run"
    assert _killed(_in_child(lambda: tiny.run(run, "lazy-adam"), "kill:step:2:1:1"))
    first = run / "checkpoints" / "00_backbone.pt"  # not the checkpoint the resumed stage loads
    kept = first.read_bytes()
    for damaged in (b"garbage", kept[:-1] + bytes([kept[-1] ^ 1]), (run / "checkpoints" / "01_expert_0.pt").read_bytes()):
        first.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"00_backbone\.pt' is not the one this run wrote"):
            tiny.run(run, "lazy-adam", resume=True)
    first.write_bytes(kept)
    settings = run / resume.SETTINGS
    recorded = settings.read_bytes()
    settings.unlink()
    with pytest.raises(ValueError, match=r"holds a resume snapshot but no settings\.json"):
        tiny.run(run, "lazy-adam", resume=True, lr=0.05)
    settings.write_bytes(recorded[: len(recorded) // 2])
    with pytest.raises(ValueError, match=r"settings record '.*settings\.json' is damaged: .* at line"):
        tiny.run(run, "lazy-adam", resume=True)
    settings.write_bytes(recorded)
    # Another run's snapshot (same plan, another lr) copied in: it would load without error.
    other = tmp_path / "other"
    assert _killed(_in_child(lambda: tiny.run(other, "lazy-adam", lr=0.002), "kill:step:0:2:1"))
    snapshot = (run / SNAPSHOT).read_bytes()
    (run / SNAPSHOT).write_bytes((other / SNAPSHOT).read_bytes())
    with pytest.raises(ValueError, match=r"resume\.pt' was not written by the run recorded in"):
        tiny.run(run, "lazy-adam", resume=True)
    (run / SNAPSHOT).write_bytes(snapshot)
    # SIGTERM while the test split is scored (after training's last step boundary).
    from moefast.train import loop

    scored = loop._score

    def terminated(model: Any, dataset: Any, split_name: str, *args: Any) -> Any:
        if split_name == "test":
            os.kill(os.getpid(), signal.SIGTERM)
        return scored(model, dataset, split_name, *args)

    monkeypatch.setattr(loop, "_score", terminated)
    with pytest.raises(Preempted, match="after training, before the outputs were written"):
        tiny.run(run, "lazy-adam", resume=True)
    assert not (run / "metrics.json").exists()
    monkeypatch.setattr(loop, "_score", scored)
    # A snapshot of a data-parallel run resumed by one process: warned about, not refused.
    state = torch.load(run / SNAPSHOT, weights_only=True)
    assert state["world_size"] == 1
    torch.save({**state, "world_size": 2}, run / SNAPSHOT)
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), this run has 1"):
        tiny.run(run, "lazy-adam", resume=True)
    assert_same_run(run, reference["lazy-adam"])


def test_a_crafted_snapshot_that_passes_the_format_checks_is_refused_before_the_model_changes(
    tmp_path: Path,
) -> None:
    """A snapshot with the right format, version and settings digest whose stage state is
    incomplete, mistyped or shaped for another model: one ValueError, and the model passed to
    fit is untouched (the checks run before any load)."""
    run = tmp_path / "run"
    assert _killed(_in_child(lambda: tiny.run(run, "lazy-adam"), "kill:step:1:2:1"))
    good = torch.load(run / SNAPSHOT, weights_only=True)
    assert good["stage"] is not None  # inside stage 1, after its first epoch

    def without(key: str) -> dict[str, Any]:
        return {k: v for k, v in good["stage"].items() if k != key}

    name, tensor = next((k, v) for k, v in good["stage"]["model"].items() if v.dim() == 2)
    adam = good["stage"]["optimizer"]
    index = next(iter(adam["state"]))
    crafted = {
        r"'optimizer' is NoneType": without("optimizer"),
        r"'samples' is str": {**good["stage"], "samples": "12"},
        r"a mid-epoch state without its epoch's generator state": {**without("epoch_generator"), "batches": 3},
        r"the early-stopping state lacks 'best' or 'stale'": {**good["stage"], "stopper": {"best": 0.5}},
        rf"its model tensors differ from this model's by name \({name}": {
            **good["stage"], "model": {k: v for k, v in good["stage"]["model"].items() if k != name}},
        rf"model tensor '{name}' is not a torch.float32 tensor": {
            **good["stage"], "model": {**good["stage"]["model"], name: tensor[:-1]}},
        r"its optimizer state is for other parameter groups": {**good["stage"], "optimizer": {**adam, "param_groups": []}},
        rf"optimizer state 'exp_avg' of parameter {index} has shape": {**good["stage"], "optimizer": {
            **adam, "state": {**adam["state"], index: {**adam["state"][index], "exp_avg": torch.zeros(3)}}}},
        # Found by review: these crashed the process (a segfault, an abort) or raised a TypeError.
        r"its optimizer state is for other parameter groups$": {**good["stage"], "optimizer": {
            **adam, "param_groups": [{**g, "params": g["params"][::-1]} for g in adam["param_groups"]]}},
        rf"optimizer state 'exp_avg' of parameter {index} has shape \(\)": {**good["stage"], "optimizer": {
            **adam, "state": {**adam["state"], index: {**adam["state"][index], "exp_avg": torch.tensor(0.0)}}}},
        rf"the optimizer state of parameter {index} holds \['exp_avg_sq', 'step'\]": {**good["stage"], "optimizer": {
            **adam, "state": {**adam["state"], index: {k: v for k, v in adam["state"][index].items() if k != "exp_avg"}}}},
        r"its optimizer state is for other parameter groups(?#: no lr)": {**good["stage"], "optimizer": {
            **adam, "param_groups": [{k: v for k, v in g.items() if k != "lr"} for g in adam["param_groups"]]}},
        r"the early-stopping state .* is not a score and a count": {**good["stage"], "stopper": {"best": 0.5, "stale": [1]}},
        r"'history' holds something other than numbers": {**good["stage"], "history": ["a"]},
        r"'batches' is -3, below 0": {**good["stage"], "batches": -3},
        r"a mid-epoch state without its epoch's generator state \(a uint8": {
            **good["stage"], "batches": 2, "epoch_generator": torch.zeros(3)},
    }
    ds = tiny.dataset()
    # What the model holds before the stage's state is loaded: the finished stage's checkpoint.
    expected = models.build("deepfm", ds, "moe-mlora", seed=7)
    loop.set_embedding_optimizer(expected, loop._fused_embedding_optimizer(tiny.config("lazy-adam")))
    load_checkpoint(run / "checkpoints" / "00_backbone.pt", expected)
    for message, stage in crafted.items():
        torch.save({**good, "stage": stage}, run / SNAPSHOT)
        model = models.build("deepfm", ds, "moe-mlora", seed=7)
        with pytest.raises(ValueError, match=rf"snapshot's state of stage .* does not fit this run: {message}"):
            fit(model, ds, tiny.config("lazy-adam"), backend="fast", out_dir=run, resume=True)
        assert all(torch.equal(expected.state_dict()[k], v) for k, v in model.state_dict().items()), message
