"""Resuming a killed run: the snapshot, the run's settings record, preemption by ``SIGTERM``.

A run directory being trained holds one resume snapshot, ``<run>/resume.pt`` (only the last is
kept; each is written atomically over the previous one). It is written

- after every validation and at a stage's end: the model (its buffers hold the fused embedding
  optimizers' state), the stage's dense Adam, early stopping, the best weights so far, the
  validation history, the losses, the position (stage index, epochs done, batches done in the
  epoch with the batch-order generator as the epoch found it) and the RNG states (torch's
  global generator, which draws dropout, and the batch-order generator);
- at an epoch's end, when the stage has written none for :data:`SNAPSHOT_SECONDS` (an expert's
  epoch may be a single step, and writing a snapshot each time would cost more than training
  it). A resume replays the epochs since the last snapshot, so this decides only
  how much work a kill loses, never what the run computes;
- at a step boundary when ``SIGTERM`` asks the run to stop (preemption): the same, plus the
  batches done in the epoch and the batch-order generator as it was before the epoch drew its
  permutation, so the epoch's remaining batches are the ones it would have run;
- after every stage, once its checkpoint is written: the stage records and the RNG states only
  (the model is the checkpoint). After the last stage this small snapshot stays: it marks the
  training as complete, and a resume only recomputes the test predictions and outputs.

A streamed log (:class:`moefast.data.stream.StreamedDataset`) needs nothing more: the epoch's
starting generator state and the batches done are what its replay takes (the epoch's row groups
are read and shuffled again, the consumed batches skipped unbuilt), and how it is read (shuffle
buffer, row-group order, shards: :func:`moefast.runs.settings.dataset_settings`) is in ``settings.json``, whose SHA-256
every snapshot records.

Resuming restores all of it, so that the run ends bitwise equal to an uninterrupted one on CPU at
a fixed thread count: ``metrics.json`` but for its timing keys, the predictions byte for byte,
the checkpoints tensor for tensor. What the resumed run must share with the first is recorded in
``<run>/settings.json`` when the run starts (:func:`moefast.runs.settings.settings_record`); a resume with other settings
is refused, naming the keys. A snapshot from another moefast version is refused (the arithmetic
may differ); another torch version is warned about. A snapshot another run wrote is refused,
and so is a resume without one where the run left results (:func:`check_resumable`).
:func:`restore_snapshot` restores what lies outside the current stage (the finished stages,
checked against the plan and their checkpoints' SHA-256; the RNG states, as :func:`rng_state`
recorded them; the registered parts), and :func:`check_stage_state` checks the state inside it
before anything is loaded.

**Extending the snapshot.** What the training loop writes at the top of a snapshot is
:data:`SNAPSHOT_KEYS`, and :func:`save_snapshot` refuses any other key. Another part of a run
that must be restored for the resumed run to be bitwise the same (a streamed loader's position
and shuffle buffer, a precision's state) registers itself once, through one function,
:func:`register_snapshot_part`, under a name of its own, with a ``get_state`` and a
``set_state``:

- every snapshot written (by ``fit`` or anything else through :func:`save_snapshot`) carries
  each registered part's ``get_state()``;
- a resumed ``fit`` hands each registered part its saved state, ``set_state(state)``, once,
  after the loop's own state (the RNG states, the finished stages) is restored and before
  training continues; ``set_state(None)`` when the snapshot holds none of it (written before
  the part existed, or by a run that did not use it): the part decides what that means;
- a snapshot holding the state of a part this process has not registered is refused
  (:func:`restore_snapshot_parts`): the resumed run could not be the run it continues.

A part's state is what ``torch.save`` takes under ``weights_only`` loading: tensors, numbers,
strings, lists and dicts. Underneath, :func:`extend_snapshot` adds one state to a payload and
:func:`snapshot_extension` reads one back.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

import torch

from moefast import _version
from moefast.runs.checkpoint import file_sha256, read_saved, state_mismatches
from moefast.runs.files import CHECKPOINTS, METRICS, SNAPSHOT

# dataset_fingerprint and dataset_settings moved to moefast.runs.settings (issue 25); still importable here.
from moefast.runs.settings import RUN_SETTINGS, _hash_tensors, dataset_fingerprint, dataset_settings
from moefast.runs.writer import atomic_write

__all__ = [
    "PREEMPTED_STATUS",
    "SETTINGS",
    "SNAPSHOT",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_SECONDS",
    "STAGE_STATE",
    "FinishedStage",
    "Preempted",
    "check_adam_state",
    "check_resumable",
    "check_stage_state",
    "dataset_fingerprint",
    "dataset_settings",
    "extend_snapshot",
    "load_snapshot",
    "preemption",
    "register_snapshot_part",
    "restore_snapshot",
    "restore_snapshot_parts",
    "rng_state",
    "save_snapshot",
    "snapshot_extension",
    "state_fingerprint",
]

SETTINGS = RUN_SETTINGS
SNAPSHOT_FORMAT = 2  # 2: the settings' and checkpoints' SHA-256, the thread count and world size
SNAPSHOT_SECONDS = 10.0  # an epoch's end writes a snapshot only this long after the last one
PREEMPTED_STATUS = 143  # the command line's exit status after SIGTERM: 128 + 15, as if killed by it
EXTENSIONS = "extensions"
# What the training loop writes at the top of a snapshot; anything else goes through
# extend_snapshot (the module docstring).
SNAPSHOT_KEYS = frozenset({"records", "rng", "stage", "settings_sha256", "world_size", "carried_optimizer",
                           EXTENSIONS})


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


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes): the model a run started
    from (a resume must rebuild the same one)."""
    h = hashlib.sha256()
    _hash_tensors(h, module.state_dict())
    return h.hexdigest()


def extend_snapshot(payload: dict[str, Any], name: str, state: Any) -> None:
    """Add ``state`` to a snapshot ``payload`` under the extension ``name``: the one way a part of
    a run other than the loop's core (:data:`SNAPSHOT_KEYS`) extends the resume snapshot.

    Raises:
        ValueError: ``name`` is already in ``payload`` (two parts under one name).
    """
    extensions = payload.setdefault(EXTENSIONS, {})
    if name in extensions:
        raise ValueError(f"the resume snapshot's extension {name!r} is given twice")
    extensions[name] = state


def snapshot_extension(snapshot: Mapping[str, Any], name: str) -> Any | None:
    """The state the extension ``name`` stored in a loaded snapshot; ``None`` when the snapshot
    has none (written before the extension existed, or by a run that did not use it)."""
    return (snapshot.get(EXTENSIONS) or {}).get(name)


@dataclass(frozen=True)
class _Part:
    get_state: Callable[[], Any]
    set_state: Callable[[Any], None]


# The registered parts, by name, in registration order (register_snapshot_part).
_PARTS: dict[str, _Part] = {}


def register_snapshot_part(
    name: str, get_state: Callable[[], Any], set_state: Callable[[Any], None]
) -> Callable[[], None]:
    """Register a part of a run whose state the resume snapshot carries (the module docstring):
    every snapshot written holds ``get_state()`` under ``name``; a resumed ``fit`` calls
    ``set_state(saved)`` (``None``: the snapshot holds none). Process-wide: every ``fit`` in this
    process saves and restores it until the returned function unregisters it.

    Raises:
        ValueError: ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a snapshot part's name must be a non-empty string, not {name!r}")
    if name in _PARTS:
        raise ValueError(f"a snapshot part named {name!r} is already registered")
    part = _Part(get_state, set_state)
    _PARTS[name] = part

    def unregister() -> None:
        if _PARTS.get(name) is part:
            del _PARTS[name]

    return unregister


def restore_snapshot_parts(path: Path, snapshot: Mapping[str, Any]) -> None:
    """Hand each registered part its state saved in ``snapshot`` (read from ``path``), ``None``
    where it holds none.

    Raises:
        ValueError: the snapshot holds the state of a part this process has not registered.
    """
    saved = snapshot.get(EXTENSIONS) or {}
    unknown = sorted(set(saved) - set(_PARTS))
    if unknown:
        raise ValueError(
            f"resume snapshot {str(path)!r} holds the state of snapshot part(s) {unknown}, which this process "
            "has not registered (moefast.runs.snapshot.register_snapshot_part): resume it where they are registered"
        )
    for name, part in _PARTS.items():
        part.set_state(saved.get(name))


def save_snapshot(run_dir: Path, payload: Mapping[str, Any]) -> None:
    """Write ``<run_dir>/resume.pt`` atomically over the previous one (``WriteError`` if it cannot),
    with every registered part's state (:func:`register_snapshot_part`).

    Raises:
        ValueError: ``payload`` holds a key outside :data:`SNAPSHOT_KEYS` (extend it through
            :func:`extend_snapshot`).
    """
    unknown = sorted(set(payload) - SNAPSHOT_KEYS)
    if unknown:
        raise ValueError(f"resume snapshot keys {unknown} are not the loop's: add them with extend_snapshot")
    if _PARTS:
        payload = {**payload, EXTENSIONS: dict(payload.get(EXTENSIONS) or {})}
        for name, part in _PARTS.items():
            extend_snapshot(payload, name, part.get_state())
    full = {"format": SNAPSHOT_FORMAT, "moefast": _version.__version__, "torch": str(torch.__version__),
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
    if not isinstance(payload.get("format"), int) or not isinstance(payload.get("records"), list) or not (
            isinstance(payload.get(EXTENSIONS, {}), dict) and all(isinstance(k, str) for k in payload.get(EXTENSIONS, {}))):
        raise ValueError(f"{str(path)!r} is not a moefast resume snapshot (format {SNAPSHOT_FORMAT})")
    if payload["format"] != SNAPSHOT_FORMAT:
        # The package version alone does not change between development builds; the format does.
        raise ValueError(
            f"{str(path)!r} is a resume snapshot of format {payload['format']}, this moefast reads format "
            f"{SNAPSHOT_FORMAT}: finish the run with the moefast that started it, or start again with --overwrite"
        )
    version = _version.__version__
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


def check_resumable(run_dir: Path, snapshot: Mapping[str, Any] | None, settings_digest: str) -> None:
    """Refuse to resume ``run_dir`` from ``snapshot`` (its :func:`load_snapshot`) when the run
    recorded in its settings (SHA-256 ``settings_digest``) did not write it, or, with no snapshot,
    when the run left results.

    Raises:
        ValueError: naming the file and what to do.
    """
    if snapshot is not None and snapshot.get("settings_sha256") != settings_digest:
        # A snapshot copied in from another run (of the same plan) would load without error
        # and continue that run, not this one.
        raise ValueError(
            f"resume snapshot {str(run_dir / SNAPSHOT)!r} was not written by the run recorded in "
            f"{str(run_dir / SETTINGS)!r} (another run's snapshot?); start it again with --overwrite"
        )
    if snapshot is None and ((run_dir / CHECKPOINTS).exists() or (run_dir / METRICS).exists()):
        # Every checkpoint is written after a snapshot, and no snapshot is ever deleted: this
        # run finished under a moefast without resume, or lost its snapshot.
        raise ValueError(
            f"run directory {str(run_dir)!r} holds a run's results but no resume snapshot ({SNAPSHOT}): "
            "nothing to resume from; start it again with --overwrite (fit(..., overwrite=True))"
        )


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """A snapshot's ``rng``: torch's global generator (dropout), ``generator`` (the batch and
    domain order) and, on CUDA, the device's generator; :func:`restore_snapshot` sets them back."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


class FinishedStage(Protocol):
    """A finished stage as the training loop records it (``moefast.train.loop.StageRecord``):
    what a resume checks of it."""

    label: str
    checkpoint: Path | None
    checkpoint_sha256: str | None


_Finished = TypeVar("_Finished", bound=FinishedStage)


def restore_snapshot(
    path: Path,
    snapshot: Mapping[str, Any],
    labels: list[str],
    record: Callable[[Any], _Finished],
    generator: torch.Generator,
    device: torch.device,
) -> tuple[list[_Finished], dict[str, Any] | None]:
    """The finished stages of ``snapshot`` (read from ``path``; each entry of its ``records``
    made a record by ``record``) and the state inside the current stage (``None`` at a stage
    boundary). The snapshot's RNG states (:func:`rng_state`) and the registered parts' states
    (:func:`restore_snapshot_parts`) are restored here.

    Raises:
        ValueError: the snapshot's stages are not a start of the plan ``labels``, it is malformed,
            or a finished stage's checkpoint is missing or not the one the run wrote.
    """
    try:
        records = [record(r) for r in snapshot["records"]]
        in_stage = snapshot["stage"]
        rng = snapshot["rng"]
        done = [r.label for r in records]
        position = len(records)
        if done != labels[:position] or (in_stage is not None and (
                position == len(labels) or in_stage["index"] != position or in_stage["label"] != labels[position])):
            raise ValueError(f"its stages ({', '.join(done)}) are not this run's plan ({', '.join(labels)})")
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["generator"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"resume snapshot {str(path)!r} does not fit this run: {exc}") from None
    for finished in records:
        assert finished.checkpoint is not None
        if not finished.checkpoint.is_file():
            raise ValueError(f"resume snapshot {str(path)!r} names the checkpoint {str(finished.checkpoint)!r}, which is missing")
        # Every finished stage's checkpoint is an output of the run, not only the last one (which
        # the next stage loads): one edited, damaged or replaced since it was written is refused.
        if finished.checkpoint_sha256 is not None and file_sha256(finished.checkpoint) != finished.checkpoint_sha256:
            raise ValueError(f"checkpoint {str(finished.checkpoint)!r} is not the one this run wrote (its SHA-256 "
                             f"differs from the one recorded in {str(path)!r}): it was damaged or replaced; "
                             "start the run again with --overwrite")
    restore_snapshot_parts(path, snapshot)
    return records, in_stage


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


# The in-stage state of a snapshot (moefast.train.loop.StageState writes it), checked entry by
# entry before anything is loaded: the required entries and their types. Entries added later
# (loss_history, stopped_by, the stopper's best_auc / best_step / best_epoch) are optional, so
# that snapshots written before them still resume.
STAGE_STATE = {
    "epochs": int, "batches": int, "model": dict, "optimizer": dict, "stopper": dict, "history": list,
    "losses": list, "samples": int, "train_seconds": float, "seconds": float,
}


def check_stage_state(
    state: Mapping[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> None:
    """Refuse, before anything is loaded into the model or optimizer, a snapshot's in-stage state
    that this stage cannot take (a crafted or foreign file that passed the format checks): a
    missing or mistyped entry, or a tensor of another name, shape or dtype than the model's."""

    def refuse(what: str) -> ValueError:
        return ValueError(f"the resume snapshot's state of stage {state.get('label')!r} does not fit this run: {what}")

    for key, kind in STAGE_STATE.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise refuse(f"{key!r} is {type(value).__name__}, not {kind.__name__}")
    check_numbers(state, refuse)
    expected = model.state_dict()
    saved = state["model"]
    missing, unexpected, wrong = state_mismatches(expected, saved)
    if missing or unexpected:
        names = sorted({*missing, *unexpected})
        raise refuse(f"its model tensors differ from this model's by name ({', '.join(names[:5])})")
    if wrong:
        name = wrong[0][0]
        tensor = expected[name]
        raise refuse(f"model tensor {name!r} is not a {tensor.dtype} tensor of shape {tuple(tensor.shape)}")
    best = state.get("best_state")
    if best is not None and (not isinstance(best, list) or len(best) != len(params) or any(
            not isinstance(t, torch.Tensor) or t.shape != p.shape for t, p in zip(best, params, strict=False))):
        raise refuse("its best weights do not match the stage's trainable parameters")
    check_adam_state(state["optimizer"], optimizer, refuse)


def check_numbers(state: Mapping[str, Any], refuse: Callable[[str], ValueError]) -> None:
    """The counters and histories of a snapshot's in-stage state: whole numbers in range, real
    numbers where they are read as such, and a generator state of torch's size."""
    for key in ("epochs", "batches", "samples"):
        if state[key] < 0:
            raise refuse(f"{key!r} is {state[key]}, below 0")
    stopper = state["stopper"]
    if not {"best", "stale"} <= set(stopper):
        raise refuse("the early-stopping state lacks 'best' or 'stale'")
    if not isinstance(stopper["best"], (int, float)) or isinstance(stopper["best"], bool) \
            or not isinstance(stopper["stale"], int) or isinstance(stopper["stale"], bool) or stopper["stale"] < 0:
        raise refuse(f"the early-stopping state {stopper!r} is not a score and a count")
    for key in ("history", "losses", "loss_history"):
        values = state.get(key, [])
        if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise refuse(f"{key!r} holds something other than numbers")
    if state.get("stopped_by") not in (None, "patience", "cap"):
        raise refuse(f"'stopped_by' is {state['stopped_by']!r}, not patience, cap or None")
    for key in ("best_step", "best_epoch"):
        value = stopper.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise refuse(f"the early-stopping state's {key!r} is {value!r}, not a count")
    if "best_auc" in stopper and (not isinstance(stopper["best_auc"], (int, float)) or isinstance(stopper["best_auc"], bool)):
        raise refuse(f"the early-stopping state's 'best_auc' is {stopper['best_auc']!r}, not a number")
    if state["batches"]:
        generator = state.get("epoch_generator")
        size = torch.Generator().get_state().shape
        if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8 or generator.shape != size:
            raise refuse("a mid-epoch state without its epoch's generator state (a uint8 tensor "
                         f"of shape {tuple(size)})")


def check_adam_state(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                      refuse: Callable[[str], ValueError]) -> None:
    """A saved ``torch.optim.Adam`` state for exactly this optimizer's groups: the same
    parameter numbering and group options, and each parameter's ``step``, ``exp_avg`` and
    ``exp_avg_sq`` (``max_exp_avg_sq`` under amsgrad), the moments of the parameter's shape."""
    mine = optimizer.state_dict()["param_groups"]
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(mine) or any(
            not isinstance(g, dict) or set(g) != set(m) or g.get("params") != m["params"]
            for g, m in zip(groups, mine, strict=False)):
        raise refuse("its optimizer state is for other parameter groups")
    for g, m in zip(groups, mine, strict=True):
        for key, value in g.items():
            if key != "params" and type(value) is not type(m[key]) and not (
                    isinstance(value, (int, float)) and isinstance(m[key], (int, float))):
                raise refuse(f"optimizer option {key!r} is {value!r}, not like {m[key]!r}")
    shapes = {i: p.shape for i, p in zip((i for m in mine for i in m["params"]),
                                         (p for group in optimizer.param_groups for p in group["params"]),
                                         strict=True)}
    entries = saved.get("state")
    if not isinstance(entries, dict):
        raise refuse("its optimizer state has no per-parameter state")
    moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if mine and mine[0].get("amsgrad") else ())
    for index, entry in entries.items():
        if not isinstance(index, int) or index not in shapes or not isinstance(entry, dict):
            raise refuse(f"its optimizer state names parameter {index!r}, which this stage does not train")
        if set(entry) != {"step", *moments}:
            raise refuse(f"the optimizer state of parameter {index} holds {sorted(entry)}, not "
                         f"{sorted({'step', *moments})}")
        step = entry["step"]
        if not (isinstance(step, torch.Tensor) and step.numel() == 1 and step.is_floating_point()) or float(step) < 0:
            raise refuse(f"the optimizer step of parameter {index} is not a count")
        for key in moments:
            value = entry[key]
            if not isinstance(value, torch.Tensor) or value.shape != shapes[index] or not value.is_floating_point():
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise refuse(f"optimizer state {key!r} of parameter {index} has shape {got}, "
                             f"the parameter {tuple(shapes[index])}")
