"""One channel for what a run tells its user (issue 25): ``moefast.log``, one quiet switch, and
progress bars only on a terminal. Redirected (a file, a CI log), ``moefast train`` writes whole
lines, one per validation (with ``--eval-every none``, one per epoch), never a bar's
carriage-return frames; the experiments take no ``say`` callback. (``--eval-every none`` given
as a flag used to be dropped as "not given", leaving the 100-step default: the first test
fails on that.)"""

from __future__ import annotations

import inspect
import io
import logging
import re
import sys
from pathlib import Path

import pytest
from _stream_data import stream_schema, write_log

import moefast
from moefast import cli, log
from moefast.data import firstpass
from moefast.experiments.claims import run_claims
from moefast.experiments.grid import run_grid
from moefast.experiments.methods import run_methods

TINY = ["train", "--preset", "paper", "--rows", "1200", "--num-domains", "2", "--num-users", "40",
        "--num-items", "30", "--method", "base", "--batch-size", "256", "--max-epochs", "3",
        "--eval-every", "none"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def channel_level() -> None:
    """The CLI configures the process-wide channel: put its level back after each test."""
    level = log.LOGGER.level
    yield
    log.LOGGER.setLevel(level)


def test_redirected_train_writes_one_line_per_epoch_and_no_frames(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*TINY, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err, err
    epochs = [line for line in err.splitlines() if re.match(r"\[1/1\] joint epoch \d, step \d+: val mean AUC", line)]
    assert [e.split(",")[0] for e in epochs] == [f"[1/1] joint epoch {n}" for n in (1, 2, 3)], err


def test_bars_draw_on_a_terminal_and_quiet_silences_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main([*TINY, "--max-epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert "\r" in terminal.getvalue() and "joint epoch 1" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert cli.main([*TINY, "--max-epochs", "1", "--quiet", "--out", str(tmp_path / "quiet")]) == 0
    assert "\r" not in quiet.getvalue() and "joint epoch" not in quiet.getvalue()
    assert not log.LOGGER.isEnabledFor(logging.INFO)


def test_the_experiments_speak_only_through_the_channel() -> None:
    for function in (run_grid, run_claims, run_methods):
        assert "say" not in inspect.signature(function).parameters, function.__name__


@pytest.mark.parametrize("terminal, quiet, progress, drawn",
                         [(True, False, None, True), (True, True, None, False), (False, False, None, False),
                          (False, True, True, True), (True, False, False, False)],
                         ids=["terminal", "quiet", "redirected", "asked-for", "refused"])
def test_the_data_readers_bars_follow_the_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool, quiet: bool, progress: bool | None,
    drawn: bool
) -> None:
    """The table reader's and the first pass's bars obey the same rule as training's (they used
    tqdm directly, on whenever standard error was a terminal, quiet or not); an explicit
    ``progress`` decides alone."""
    log_dir = write_log(tmp_path / "log", n=300)
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    log.configure(quiet=quiet)
    moefast.data.load("table", path=log_dir, schema=stream_schema(), use_cache=False, progress=progress)
    firstpass.first_pass(log_dir, stream_schema(), progress=progress)
    frames = stderr.getvalue()
    assert ("reading" in frames and "first pass" in frames and "\r" in frames) is drawn, frames
    assert drawn or frames == "", frames
