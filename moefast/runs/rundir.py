"""The run directory of DESIGN.md section 5.

::

    <run>/settings.json        how the run started (data fingerprint, model, tower, training
                               options): the one record, compared on resume (config.json in
                               runs of older versions)
    <run>/metrics.json         the schema of DESIGN.md section 5 (keys may be added, not renamed)
    <run>/predictions.csv      the test split: domain, label, score (probability);
                               predictions.parquet for a streamed log, written batch by batch
                               as the test split is scored
    <run>/checkpoints/NN_<stage>.pt   one per stage, best weights, atomic; after the first, only what
                                      the stage trained and its base (moefast.runs.checkpoint)
    <run>/settings.json        what a resume must share: data fingerprint, model, options
                               (the one settings record, moefast.runs.settings)
    <run>/resume.pt            the last resume snapshot (moefast.runs.snapshot)
    <run>/val_auc.png          validation AUC per epoch, one line per stage
    <run>/per_domain_auc.png   test AUC per domain
    <run>/gate_weights.png     MoE-MLoRA only: gate weight of every expert for every domain

Predictions are ``CSV``; Parquet outputs come with the tabular source (pyarrow is a declared
dependency).

Every file of a run directory but the marker is written by the one writer
(:mod:`moefast.runs.writer`: atomic, ``fsync``-ed, a full disk a one-line ``WriteError``);
``tests/test_one_writer.py`` lints the tree for any other way to write a file and checks that
every file the commands leave went through it. The marker is the exception: it is written in
place through the descriptor that holds its lock (below). A run directory
belongs to one run (:func:`claim_run_dir`). The run writes a marker,
``<run>/.moefast-run`` (JSON: format, moefast version, creation time, pid), and holds an
exclusive ``fcntl.flock`` on it while it runs, so a second live process on the same directory is
refused. A directory that already holds anything besides the marker is refused unless
``overwrite`` is given, and ``overwrite`` clears only a directory that carries the marker (what
a previous run left: checkpoints of another plan, ``metrics.json``, ``.tmp`` files), never an
arbitrary folder; ``resume`` keeps it to continue the run.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from moefast._version import __version__
from moefast.data.dataset import MultiDomainDataset
from moefast.data.stream import StreamedDataset
from moefast.runs.files import (
    CHECKPOINTS,
    GATE_WEIGHTS_PLOT,
    MARKER,
    METRICS,
    PER_DOMAIN_AUC_PLOT,
    PREDICTIONS,
    STREAMED_PREDICTIONS,
    VAL_AUC_PLOT,
)
from moefast.runs.settings import to_jsonable
from moefast.runs.writer import pyplot, save_figure, write_batches, write_frame, write_text

__all__ = [
    "MARKER",
    "RunDirectory",
    "RunDirectoryError",
    "RunResult",
    "claim_run_dir",
    "hold_lock",
    "plot_methods",
    "write_json",
    "write_run",
]

MARKER_FORMAT = 1


class RunDirectoryError(ValueError):
    """A run directory cannot be used: not writable, another run's, or in use by a live process."""


# The run directories this process holds, by real path: a nested claim of one of them (the CLI
# claims --out before the data loads, then fit() runs into it) shares the outer claim.
_HELD: dict[str, RunDirectory] = {}


class RunDirectory:
    """A claimed run directory: the marker is written and locked until :meth:`release`."""

    def __init__(self, path: Path, fd: int | None, created: bool) -> None:
        self.path = path
        self._fd = fd
        self._created = created

    @property
    def owner(self) -> bool:
        """Whether this handle holds the lock (a nested claim shares the outer one's)."""
        return self._fd is not None

    def release(self) -> None:
        """Unlock. A directory the claim created and nothing was written into is removed again,
        so a run refused after its claim (a bad data option) leaves nothing behind."""
        if self._fd is None:
            return
        _HELD.pop(os.path.realpath(self.path), None)
        try:
            entries = [e for e in os.listdir(self.path) if e != MARKER]
            if not entries:
                (self.path / MARKER).unlink(missing_ok=True)
                if self._created:
                    self.path.rmdir()
        except OSError:
            pass  # best effort: the directory was already usable, the lock goes below
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def claim_run_dir(
    path: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False
) -> RunDirectory:
    """Make ``path`` this run's directory: create it, refuse another run's, lock it, write the marker.

    Args:
        path: the run directory (created with its parents if missing).
        overwrite: clear a directory that holds a previous moefast run (it carries the marker).
        resume: keep what a previous run of this directory left (it carries the marker), to
            continue it; only the temporary files of writes that a kill interrupted are removed.

    Raises:
        RunDirectoryError: ``path`` is a file or cannot be created or written; it is not empty and
            carries no marker (never cleared, even with ``overwrite``); it holds a previous run
            and neither ``overwrite`` nor ``resume`` is set; or a live process holds it.
    """
    if overwrite and resume:
        raise RunDirectoryError("overwrite and resume exclude each other: one replaces the run, the other continues it")
    run_dir = Path(path)
    held = _HELD.get(os.path.realpath(run_dir))
    if held is not None:
        return RunDirectory(run_dir, None, False)
    where = str(run_dir)
    # Inside a run that a live process holds (a method's subdirectory of a live multi-method
    # run): writing or clearing here would change that run's files under it. Checked before
    # anything is created.
    live = _live_run(Path(os.path.realpath(run_dir)).parents)
    if live is not None:
        raise _part_of(where, live)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"run directory {where!r} exists and is not a directory")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        entries = os.listdir(run_dir)
    except OSError as exc:
        raise RunDirectoryError(f"run directory {where!r} cannot be created: {exc.strerror or exc}") from None
    if entries and MARKER not in entries:
        raise RunDirectoryError(
            f"run directory {where!r} is not empty and is not a moefast run directory (no {MARKER}); "
            "choose another directory (overwrite clears only moefast's own run directories)"
        )
    fd = _open_locked(run_dir / MARKER, f"run directory {where!r}")
    try:
        previous = [e for e in os.listdir(run_dir) if e != MARKER]  # under the lock
        live = _live_run(run_dir / e for e in previous) if overwrite else None
        if live is not None:  # a live method's subdirectory of the run --overwrite would clear
            raise _part_of(where, live)
        if resume:
            _remove_stale_temporaries(run_dir)
            previous = []
        elif previous and not overwrite:
            raise RunDirectoryError(
                f"run directory {where!r} holds a previous run ({len(previous)} entries, e.g. "
                f"{sorted(previous)[0]!r}); pass --overwrite (fit(..., overwrite=True)) to replace it, "
                "or choose another directory"
            )
        for name in previous:
            entry = run_dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        marker = {"format": MARKER_FORMAT, "moefast": __version__, "pid": os.getpid(),
                  "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(marker) + "\n").encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise RunDirectoryError(f"run directory {where!r} is not writable: {exc.strerror or exc}") from None
    except BaseException:
        os.close(fd)
        raise
    claim = RunDirectory(run_dir, fd, created)
    _HELD[os.path.realpath(run_dir)] = claim
    return claim


def _part_of(where: str, live: Path) -> RunDirectoryError:
    return RunDirectoryError(f"run directory {where!r} is part of the run {str(live)!r}, in use by another live "
                             "moefast process")


def _live_run(folders: Iterable[Path]) -> Path | None:
    """The first of ``folders`` whose marker another process holds locked (one this process holds,
    the command line's claim around fit's, is not another's)."""
    for folder in folders:
        marker = folder / MARKER
        if os.path.realpath(folder) in _HELD or not marker.is_file():
            continue
        try:
            fd = os.open(marker, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return folder
        finally:
            os.close(fd)  # drops the shared lock, if taken
    return None


def _remove_stale_temporaries(run_dir: Path) -> None:
    """The temporary files (``.<name>.<random>.tmp``, :func:`moefast.runs.writer.atomic_write`) of
    writes a killed process never renamed; under the lock, no live writer owns them."""
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                    entry.unlink()


@contextlib.contextmanager
def hold_lock(path: Path, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing) for the ``with`` block;
    ``wait``: block while another process holds it (a short critical section, such as adding a
    row to a shared table) instead of refusing.

    Raises:
        RunDirectoryError: another live process holds it (``what`` names the thing locked; not
            with ``wait``), or the lock file cannot be created.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirectoryError(f"{what} cannot be locked ({str(path)!r}): {exc.strerror or exc}") from None
    fd = _open_locked(path, what, wait=wait)
    try:
        yield
    finally:
        os.close(fd)


def _open_locked(path: Path, what: str, *, wait: bool = False) -> int:
    """A descriptor of the file ``path`` (created if missing) holding an exclusive ``flock``.

    Raises:
        RunDirectoryError: the file cannot be opened for writing, or another live process holds
            the lock (``what`` names the thing locked).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirectoryError(f"{what} is not writable ({str(path)!r}): {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirectoryError(f"{what} is in use by another live moefast process") from None
    return fd


class StageHistory(Protocol):
    """What the validation plot reads of one stage (``moefast.train.loop.StageRecord``)."""

    @property
    def label(self) -> str: ...

    @property
    def val_history(self) -> Sequence[float]: ...


class RunResult(Protocol):
    """What a run directory is written from (``moefast.train.loop.FitResult``, which imports
    this module: the run directory does not import the loop back)."""

    @property
    def metrics(self) -> Mapping[str, Any]: ...

    @property
    def stages(self) -> Sequence[StageHistory]: ...

    @property
    def test_logits(self) -> torch.Tensor: ...

    @property
    def gate_weights(self) -> torch.Tensor | None: ...

    @property
    def test_label(self) -> torch.Tensor: ...

    @property
    def predictions_written(self) -> bool: ...

    @property
    def test_domain(self) -> torch.Tensor: ...


def write_json(path: Path, payload: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """``payload`` as JSON (:func:`to_jsonable`), written by the one writer."""
    write_text(path, json.dumps(to_jsonable(payload), indent=indent, sort_keys=sort_keys) + "\n")


def write_run(run_dir: Path, result: RunResult, dataset: MultiDomainDataset | StreamedDataset) -> None:
    """Write everything but the checkpoints (which the stages wrote already) and settings.json
    (written when the run started: the one record of how it started; the config.json of older
    runs, a second record, is still read back by :mod:`moefast.runs.read` but no longer written)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # The features, domain map and id provenance that moefast export / predict read back.
    from moefast.runs.records import DATASET_RECORD, write_dataset_record

    write_dataset_record(run_dir / DATASET_RECORD, dataset)
    write_json(run_dir / METRICS, result.metrics)
    if dataset.info.get("stream"):  # a streamed log's test split may not fit a frame: Parquet, in chunks
        if not result.predictions_written:  # written while scoring (write_scored_predictions) otherwise
            write_scored_predictions(run_dir, _prediction_chunks(result))
    else:
        _write_predictions(run_dir / PREDICTIONS, result)
    _plot_val_history(run_dir / VAL_AUC_PLOT, result)
    plot_methods(run_dir / PER_DOMAIN_AUC_PLOT, {result.metrics["method"]: result.metrics})
    if result.gate_weights is not None:
        _plot_gate(run_dir / GATE_WEIGHTS_PLOT, result.gate_weights, dataset.domain_names)


def _write_predictions(path: Path, result: RunResult) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "domain": result.test_domain.numpy(),
            "label": result.test_label.numpy().astype("int8"),
            "score": torch.sigmoid(result.test_logits.double()).numpy(),
        }
    )
    write_frame(path, frame)


PREDICTION_CHUNK_ROWS = 1 << 16


def write_scored_predictions(run_dir: Path, scored: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """A streamed run's test predictions, ``predictions.parquet`` (``domain``, ``label``,
    ``score``), each batch written as ``scored`` yields its ``(logits, labels, domains)``: what
    is added to the 9 bytes a row the exact AUC gathers is one batch. Nothing is left under the
    name when ``scored`` raises (the writer's temporary file is removed)."""
    import pyarrow as pa

    def batches() -> Iterator[Any]:
        empty = True
        for logits, label, domain in scored:
            empty = False
            yield pa.record_batch({
                "domain": pa.array(domain.numpy().astype("int64")),
                "label": pa.array(label.numpy().astype("int8")),
                "score": pa.array(torch.sigmoid(logits.double()).numpy()),
            })
        if empty:  # a file with the columns and no row
            yield pa.record_batch({"domain": pa.array([], pa.int64()), "label": pa.array([], pa.int8()),
                                   "score": pa.array([], pa.float64())})

    write_batches(run_dir / STREAMED_PREDICTIONS, batches())


def _prediction_chunks(result: RunResult) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The gathered test predictions in chunks of :data:`PREDICTION_CHUNK_ROWS` rows (a
    data-parallel run's, whose other ranks' rows arrive with the gather)."""
    n = int(result.test_logits.numel())
    for start in range(0, n, PREDICTION_CHUNK_ROWS):
        stop = min(start + PREDICTION_CHUNK_ROWS, n)
        yield result.test_logits[start:stop], result.test_label[start:stop], result.test_domain[start:stop]


def _plot_val_history(path: Path, result: RunResult) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    epoch0 = 0
    for record in result.stages:
        xs = list(range(epoch0 + 1, epoch0 + len(record.val_history) + 1))
        ax.plot(xs, record.val_history, marker="o", label=record.label)
        epoch0 += len(record.val_history)
    ax.set_xlabel("epoch (stages one after another)")
    ax.set_ylabel("validation AUC (early-stopping metric)")
    ax.set_title(f"{result.metrics['model']} / {result.metrics['method']}")
    if len(result.stages) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _plot_gate(path: Path, gate: torch.Tensor, domain_names: Sequence[str]) -> None:
    plt = pyplot()
    d, e = gate.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * e + 2), max(3.0, 0.4 * d + 1.5)))
    image = ax.imshow(gate.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xlabel(f"expert (expert i belongs to domain i % {d})")
    ax.set_ylabel("domain")
    ax.set_yticks(range(d), [str(n) for n in domain_names])
    ax.set_xticks(range(e))
    fig.colorbar(image, ax=ax, label="gate weight")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_methods(path: Path, metrics_by_method: Mapping[str, Mapping[str, Any]]) -> None:
    """Grouped bars: test AUC per domain, one bar per method (a null AUC draws no bar)."""
    plt = pyplot()
    methods = list(metrics_by_method)
    first = metrics_by_method[methods[0]]["test"]["per_domain"]
    names = [str(row["name"]) for row in first]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.3 * len(names) * len(methods) + 3)), 4.5))
    lows = []
    for k, method in enumerate(methods):
        rows = metrics_by_method[method]["test"]["per_domain"]
        aucs = [math.nan if row["auc"] is None else row["auc"] for row in rows]
        lows += [a for a in aucs if not math.isnan(a)]
        ax.bar([i + k * width for i in range(len(rows))], aucs, width, label=method)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45, ha="right")
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.02), min(1.0, max(lows) + 0.01))
    ax.set_ylabel("test AUC")
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
