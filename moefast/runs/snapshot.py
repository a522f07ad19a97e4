"""Resuming a killed run: the snapshot, the run's settings record, preemption by ``SIGTERM``.

A run directory being trained holds one resume snapshot, ``<run>/resume.pt`` (only the last is
kept; each is written atomically over the previous one). It is written

- after every epoch: the model (its buffers hold the fused embedding optimizers' state), the
  stage's dense Adam, early stopping, the best weights so far, the validation history, the
  losses, the position (stage index, epochs done) and the RNG states (torch's global generator,
  which draws dropout, and the batch-order generator);
- at a step boundary when ``SIGTERM`` asks the run to stop (preemption): the same, plus the
  batches done in the epoch and the batch-order generator as it was before the epoch drew its
  permutation, so the epoch's remaining batches are the ones it would have run;
- after every stage, once its checkpoint is written: the stage records and the RNG states only
  (the model is the checkpoint). After the last stage this small snapshot stays: it marks the
  training as complete, and a resume only recomputes the test predictions and outputs.

Resuming restores all of it, so that the run ends bitwise equal to an uninterrupted one on CPU at
a fixed thread count: ``metrics.json`` but for its timing keys, the predictions byte for byte,
the checkpoints tensor for tensor. What the resumed run must share with the first is recorded in
``<run>/settings.json`` when the run starts (:func:`run_settings`); a resume with other settings
is refused, naming the keys. A snapshot from another moefast version is refused (the arithmetic
may differ); another torch version is warned about.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from moefast.data.dataset import MultiDomainDataset
from moefast.runs.checkpoint import read_saved
from moefast.runs.writer import atomic_write

__all__ = [
    "PREEMPTED_STATUS",
    "SETTINGS",
    "SNAPSHOT",
    "SNAPSHOT_FORMAT",
    "Preempted",
    "dataset_fingerprint",
    "load_snapshot",
    "preemption",
    "save_snapshot",
    "state_fingerprint",
]

SNAPSHOT = "resume.pt"
SETTINGS = "settings.json"
SNAPSHOT_FORMAT = 2  # 2: the settings' and checkpoints' SHA-256, the thread count and world size
PREEMPTED_STATUS = 143  # the command line's exit status after SIGTERM: 128 + 15, as if killed by it


class Preempted(Exception):
    """``SIGTERM`` stopped the run at a step boundary; its resume snapshot is written.

    ``run_dir`` continues with ``moefast train --resume`` or ``fit(..., resume=True)``. The
    command line exits with status 143 (128 + SIGTERM, what a scheduler expects of a job it
    terminated).
    """

    def __init__(self, run_dir: Path, where: str, how: str | None = None) -> None:
        how = how or f"moefast train --resume {run_dir}"
        super().__init__(f"stopped by SIGTERM {where}; the state is saved in {str(run_dir)!r}: "
                         f"continue it with {how}")
        self.run_dir = run_dir
        self.where = where


def _version() -> str:
    from moefast.runs.rundir import _version as moefast_version

    return moefast_version()


def _hash_tensors(h: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def dataset_fingerprint(dataset: MultiDomainDataset) -> str:
    """SHA-256 of a dataset's content: its name, features, domains and every split's tensors and
    pretrained table (not where it was read from: the same data in another folder is the same
    data, other data under the same path is not)."""
    from moefast.runs.rundir import to_jsonable

    h = hashlib.sha256()
    header = {"name": dataset.name, "features": dataset.features, "numeric": dataset.numeric,
              "domains": dataset.domain_names}
    h.update(json.dumps(to_jsonable(header), sort_keys=True).encode() + b"\0")
    for split_name in ("train", "val", "test"):
        split = getattr(dataset, split_name)
        _hash_tensors(h, {f"{split_name}.{k}": v for k, v in split.features.items()}
                      | {f"{split_name}.domain": split.domain, f"{split_name}.label": split.label})
    _hash_tensors(h, {f"pretrained.{k}": v for k, v in dataset.pretrained.items()})
    return h.hexdigest()


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes): the model a run started
    from (a resume must rebuild the same one)."""
    h = hashlib.sha256()
    _hash_tensors(h, module.state_dict())
    return h.hexdigest()


def save_snapshot(run_dir: Path, payload: Mapping[str, Any]) -> None:
    """Write ``<run_dir>/resume.pt`` atomically over the previous one (``WriteError`` if it cannot)."""
    full = {"format": SNAPSHOT_FORMAT, "moefast": _version(), "torch": str(torch.__version__),
            "threads": torch.get_num_threads(), **payload}
    atomic_write(run_dir / SNAPSHOT, lambda handle: torch.save(full, handle))


def load_snapshot(run_dir: Path) -> dict[str, Any] | None:
    """The run's resume snapshot, checked; ``None`` when it has none (killed before its first
    epoch ended: the run starts from the beginning).

    Raises:
        ValueError: the snapshot is damaged or not one, or another moefast version wrote it.
    """
    path = run_dir / SNAPSHOT
    if not path.exists():
        return None
    payload = read_saved(path, "resume snapshot")
    if not isinstance(payload.get("format"), int) or not isinstance(payload.get("records"), list):
        raise ValueError(f"{str(path)!r} is not a moefast resume snapshot (format {SNAPSHOT_FORMAT})")
    if payload["format"] != SNAPSHOT_FORMAT:
        # The package version alone does not change between development builds; the format does.
        raise ValueError(
            f"{str(path)!r} is a resume snapshot of format {payload['format']}, this moefast reads format "
            f"{SNAPSHOT_FORMAT}: finish the run with the moefast that started it, or start again with --overwrite"
        )
    version = _version()
    if payload.get("moefast") != version:
        raise ValueError(
            f"{str(path)!r} was written by moefast {payload.get('moefast')}, this is moefast {version}: "
            "a resumed run would not be bitwise the run it continues; finish it with the version "
            "that started it, or start again with --overwrite"
        )
    if payload.get("torch") != str(torch.__version__):
        warnings.warn(
            f"{str(path)!r} was written under torch {payload.get('torch')}, this is torch "
            f"{torch.__version__}: the resumed run may not be bitwise equal to an uninterrupted one",
            stacklevel=2,
        )
    threads = payload.get("threads")
    if threads is not None and threads != torch.get_num_threads():
        # torch's dense kernels split their sums by thread: the continuation stays a correct
        # training run but may differ from an uninterrupted one in the last bits.
        warnings.warn(
            f"{str(path)!r} was written with {threads} threads, this process uses {torch.get_num_threads()}: the "
            "resumed run may not be bitwise equal to an uninterrupted one (set OMP_NUM_THREADS to match)",
            stacklevel=2,
        )
    return payload


def float_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


class _Flag:
    """Set by the ``SIGTERM`` handler; read at every step boundary."""

    def __init__(self) -> None:
        self.raised = False

    def __bool__(self) -> bool:
        return self.raised


@contextlib.contextmanager
def preemption(enabled: bool) -> Iterator[_Flag]:
    """Turn ``SIGTERM`` into a flag for the ``with`` block (the loop stops at the next step
    boundary, writes its snapshot and raises :class:`Preempted`). Only the main thread can install
    a signal handler: elsewhere, or when not ``enabled`` (no run directory to save into),
    ``SIGTERM`` keeps its default action."""
    flag = _Flag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(_signum: int, _frame: FrameType | None) -> None:
        flag.raised = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
