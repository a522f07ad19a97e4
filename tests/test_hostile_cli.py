"""Hostile input to the exported program, the launcher and ``--resume`` (issue 29), through the
command line: each case once ran silently wrong or printed a traceback."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from moefast import cli

TINY = ["--preset", "paper", "--rows", "600", "--num-domains", "2", "--num-users", "40", "--num-items", "20"]
TRAIN = ["train", *TINY, "--method", "base", "--max-epochs", "1", "--batch-size", "128", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run exported as ``model.pt2`` (with its ``.json``)."""
    folder = tmp_path_factory.mktemp("hostile-program")
    assert cli.main([*TRAIN, "--out", str(folder / "run")]) == 0
    out = folder / "model.pt2"
    assert cli.main(["export", str(folder / "run"), "--out", str(out), "--quiet"]) == 0
    return out


def _one_line(capsys: pytest.CaptureFixture[str], text: str) -> str:
    """The one ``moefast: error:`` line on stderr (capfd as well: torch logs to the real stderr)."""
    err = capsys.readouterr().err
    assert err.startswith("moefast: error:") and text in err and len(err.strip().splitlines()) == 1, err
    return err


def _copy(program: Path, where: Path) -> Path:
    where.mkdir()
    for name in (program.name, f"{program.name}.json"):
        shutil.copyfile(program.parent / name, where / name)
    return where / program.name


def test_a_damaged_program_is_refused_before_loading(
    program: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One altered weight: torch.export.load does not check the archive's CRCs, and predict
    scored different logits with exit status 0."""
    meta = json.loads((program.parent / f"{program.name}.json").read_text())
    assert len(meta["program_sha256"]) == 64
    good = _copy(program, tmp_path / "good")
    assert cli.main(["predict", "--model", str(good), "--quiet", "--out", str(tmp_path / "ok.csv")]) == 0

    damaged = _copy(program, tmp_path / "damaged")
    data = bytearray(damaged.read_bytes())
    at = data.index(b"data/0") + 4096 if b"data/0" in data else len(data) // 2  # inside a weight member
    data[at] ^= 0x01
    damaged.write_bytes(bytes(data))
    assert cli.main(["predict", "--model", str(damaged), "--quiet", "--out", str(tmp_path / "d.csv")]) == 2
    _one_line(capfd, "is not the program moefast export wrote: its SHA-256")
    assert not (tmp_path / "d.csv").exists()

    # A program whose .json records no digest (an older export): refused unless trusted.
    unrecorded = _copy(program, tmp_path / "unrecorded")
    sidecar = unrecorded.parent / f"{unrecorded.name}.json"
    sidecar.write_text(json.dumps({k: v for k, v in meta.items() if k != "program_sha256"}))
    assert cli.main(["predict", "--model", str(unrecorded), "--quiet", "--out", str(tmp_path / "u.csv")]) == 2
    _one_line(capfd, "records no SHA-256 of the program")
    assert cli.main(["predict", "--model", str(unrecorded), "--quiet", "--trust-unverified",
                     "--out", str(tmp_path / "u.csv")]) == 0
    assert (tmp_path / "u.csv").read_bytes() == (tmp_path / "ok.csv").read_bytes()

    # Truncated and trusted: one line, without the dozen lines of torch warnings before it.
    truncated = _copy(unrecorded, tmp_path / "truncated")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    recwarn.clear()
    with caplog.at_level(logging.WARNING, logger="torch.export"):
        assert cli.main(["predict", "--model", str(truncated), "--quiet", "--trust-unverified",
                         "--out", str(tmp_path / "t.csv")]) == 2
    _one_line(capfd, "cannot be loaded as a torch.export program")
    assert not [r for r in caplog.records if r.name.startswith("torch") and r.levelno >= logging.WARNING], caplog.text
    assert not [w for w in recwarn if "torch" in str(w.filename)], [str(w.message) for w in recwarn]


@pytest.mark.parametrize("case", ["not-a-run", "a-file", "unknown-model", "bad-schema"])
def test_nproc_checks_everything_without_data_before_any_rank_starts(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--nproc 2 --out <a non-empty folder that is not a run>``: rank 0 printed the right line,
    then rank 1 a 40-line gloo traceback."""
    import torch.distributed.run

    def no_rank(*_: object, **__: object) -> None:
        raise AssertionError("a rank was started")

    monkeypatch.setattr(torch.distributed.run, "main", no_rank)
    out = tmp_path / "out"
    argv = [*TRAIN, "--nproc", "2", "--out", str(out)]
    if case == "not-a-run":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expect = "is not empty and is not a moefast run directory"
    elif case == "a-file":
        out.write_text("x")
        expect = "exists and is not a directory"
    elif case == "unknown-model":
        argv += ["--model", "nope"]
        expect = "unknown model 'nope'"
    else:
        schema = tmp_path / "schema.toml"
        schema.write_text('label = "click"\n[domain]\ncolumn = "site"\n[categorical.user]\nhash_buckets = 1000000000000\n')
        (tmp_path / "log.csv").write_text("site,user,click\na,u,1\n")
        argv = ["train", "--dataset", "table", "--data", str(tmp_path / "log.csv"), "--schema", str(schema),
                "--quiet", "--nproc", "2", "--out", str(out)]
        expect = "hash_buckets' = 1000000000000 would need"
    assert cli.main(argv) == 2
    _one_line(capsys, expect)
    if case == "not-a-run":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing touched
    if case in ("unknown-model", "bad-schema"):
        assert not out.exists()


def test_resume_without_a_snapshot_says_what_it_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run killed before its first epoch ended (or whose resume.pt was deleted) started over
    under ``--resume`` without a word."""
    out = tmp_path / "run"
    assert cli.main([*TRAIN, "--out", str(out)]) == 0
    for entry in out.iterdir():  # what a kill inside the first epoch leaves
        if entry.name not in (".moefast-run", "config.toml", "settings.json"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "resume" in line]
    assert len(notes) == 1 and notes[0].startswith(f"moefast: warning: --resume {out}: the run has no resume "
                                                   "snapshot (resume.pt"), notes
    assert "starts from the first epoch" in notes[0]
    assert (out / "metrics.json").is_file()
