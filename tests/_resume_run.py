"""A tiny training run for the resume tests (issue 15), run as a subprocess that a test kills.

``python tests/_resume_run.py OUT_DIR OPTIMIZER [resume]``: one thread, MoE-MLoRA on DeepFM over
a tiny synthetic dataset (four stages), so that a kill can land in any stage, epoch or write.
The tests import :func:`run` to train the same run in their own process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from moefast import data, models
from moefast.config import EmbeddingOptimizer, TrainConfig
from moefast.data.dataset import MultiDomainDataset
from moefast.runs.writer import FAULT_ENV
from moefast.train import fit


def dataset() -> MultiDomainDataset:
    return data.load("synthetic", preset="paper", rows=600, num_domains=2, num_users=40, num_items=30)


def config(optimizer: str, **changes: Any) -> TrainConfig:
    # A validation after every epoch, so that the kill points (stage, epoch, batch) land in
    # epochs that end with one.
    options: dict[str, Any] = {"max_epochs": 3, "patience": 1, "batch_size": 128, "progress": False,
                               "eval_every": None}
    return TrainConfig(embedding_optimizer=EmbeddingOptimizer(optimizer), **(options | changes))


def run(out: Path, optimizer: str, *, resume: bool = False, method: str = "moe-mlora", **changes: Any) -> Any:
    ds = dataset()
    model = models.build("deepfm", ds, method, seed=7)
    return fit(model, ds, config(optimizer, **changes), backend="fast", out_dir=out, resume=resume)


def in_child(work: Callable[[], None], fault: str | None, kill_after: float | None = None) -> int:
    """Run ``work`` in a forked child with ``MOEFAST_TEST_FAULT=fault`` (or SIGKILL it after
    ``kill_after`` seconds); return the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            if fault is not None:
                os.environ[FAULT_ENV] = fault
            work()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)  # a zombie until reaped below: never ProcessLookupError
    deadline = time.monotonic() + 120  # a hung child fails the test instead of hanging it
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the training child {pid} did not finish within 120 s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]), sys.argv[2], resume=len(sys.argv) > 3)


def cut_and_resume(tmp: Path, monkeypatch: Any, option: str, **changes: Any) -> tuple[Path, Path]:
    """MLoRA with lazy Adam and ``changes``, trained whole into ``tmp/whole`` and, into
    ``tmp/cut``, stopped by SIGTERM after the first step of the joint stage's second epoch; a
    resume without ``changes`` must be refused naming ``train.<option>``, a resume with them then
    finishes the run. Returns (whole, cut) for the caller's comparison."""
    import pytest

    from moefast.runs.snapshot import Preempted

    whole, cut = tmp / "whole", tmp / "cut"
    run(whole, "lazy-adam", method="mlora", **changes)
    monkeypatch.setenv(FAULT_ENV, "term:step:0:2:1")
    with pytest.raises(Preempted):
        run(cut, "lazy-adam", method="mlora", **changes)
    monkeypatch.delenv(FAULT_ENV)
    without = {k: v for k, v in changes.items() if k != option}
    with pytest.raises(ValueError, match=rf"train\.{option}"):
        run(cut, "lazy-adam", method="mlora", resume=True, **without)
    run(cut, "lazy-adam", method="mlora", resume=True, **changes)
    return whole, cut



class StoppedAfterSnapshot(Exception):
    """Raised by :func:`stopping_after_snapshot`: the run was cut right after a snapshot."""


@contextlib.contextmanager
def stopping_after_snapshot(count: int) -> Iterator[None]:
    """Within it, ``fit`` raises :class:`StoppedAfterSnapshot` right after writing its
    ``count``-th in-stage resume snapshot (as a kill at that moment would leave the directory)."""
    import pytest

    from moefast.train import loop

    real = loop._Saver.in_stage
    written = [0]

    def stop_after(self: Any, stage: dict[str, Any]) -> None:
        real(self, stage)
        written[0] += 1
        if written[0] == count:
            raise StoppedAfterSnapshot

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop._Saver, "in_stage", stop_after)
        yield
