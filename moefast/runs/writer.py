"""Atomic file writes, and the test-only fault points that exercise them.

Every file a run writes under its final name (checkpoints, the resume snapshot, ``metrics.json``,
predictions, ``settings.json``) goes through :func:`atomic_write`: the bytes go to a temporary file
in the destination folder, are flushed and ``fsync``-ed, and only then renamed over the final
name (and the folder ``fsync``-ed, so the rename itself survives a power cut). A write that fails
(a full disk, a quota, an I/O error) removes its temporary file and raises :class:`WriteError`
naming the file; the final name keeps its previous content or stays absent, never half written.

Fault points (tests only). ``MOEFAST_TEST_FAULT`` names one fault, deterministic by construction:

- ``kill:step:<stage index>:<epoch>:<batch>``: the process sends itself ``SIGKILL`` right after
  training step ``<batch>`` (counted from 1) of epoch ``<epoch>`` (from 1) of stage
  ``<stage index>`` (from 0, in plan order); ``term:step:...`` sends ``SIGTERM`` instead (what a
  scheduler's preemption does). In a data-parallel job ``...:rank<r>`` after the batch limits the
  step fault to rank ``r`` (a signal that reaches one rank first).
- ``kill:write:<file name>[:<n>]``: ``SIGKILL`` after the process's ``n``-th (default first) write
  of a file of that name has reached its temporary file (written and ``fsync``-ed), before the
  rename.
- ``enospc:write:<file name>[:<n>]``: that write fails part-way (after 512 bytes) with
  ``OSError(ENOSPC)``, as on a full disk; a smaller file fails at its ``fsync`` (where a file
  system that allocates late reports it).

Unset (always, outside tests) every fault point is one dictionary lookup.

The one writer (issue 25). Every file a ``moefast`` command or library call leaves goes through
this module: :func:`atomic_write` for a writer that fills a file object, and the small helpers
over it (:func:`write_bytes`, :func:`write_text`, :func:`write_frame` for a CSV or Parquet
table, :func:`write_batches` for a Parquet or CSV file written batch by batch, :func:`save_npz`,
:func:`save_figure` after :func:`pyplot`, the one matplotlib set-up, :func:`copy_file`), plus
:func:`write_at_path` for the writers that only take a path (``torch.export.save`` names the
archive's folder after the file, ``torch.onnx.export``). ``tests/test_one_writer.py`` forbids every
other way to create or replace a file outside this module, the allowed exceptions listed there
with their reasons. Beside it, :func:`read_json`, the one reader of the JSON files moefast writes
(here so that every layer may use it, the data's ``vocab.json`` included).

``MOEFAST_TEST_WRITE_LOG`` (tests only) names a file to which every completed write appends its
final path, one a line: the test that runs every command compares it with the files on disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "FAULT_ENV",
    "WRITE_LOG_ENV",
    "WriteError",
    "atomic_write",
    "copy_file",
    "fault_step",
    "fsync_dir",
    "pyplot",
    "read_json",
    "save_figure",
    "save_npz",
    "write_at_path",
    "write_batches",
    "write_bytes",
    "write_frame",
    "write_text",
]

FAULT_ENV = "MOEFAST_TEST_FAULT"
WRITE_LOG_ENV = "MOEFAST_TEST_WRITE_LOG"

# Writes this process made per file name, for the ``:<n>`` of a write fault (keyed by pid too: a
# forked child counts its own writes).
_WRITES: dict[tuple[int, str], int] = {}


class WriteError(OSError):
    """A file could not be written (disk full, permissions, I/O error); nothing was left under its
    final name. ``errno`` is the underlying error's, ``reason`` its message."""

    reason: str = ""


def _fault() -> list[str] | None:
    spec = os.environ.get(FAULT_ENV)
    return spec.split(":") if spec else None


def fault_step(stage: int, epoch: int, batch: int) -> None:
    """The fault point after a training step (see the module docstring)."""
    fault = _fault()
    if fault is None or len(fault) not in (5, 6) or fault[1] != "step":
        return
    if len(fault) == 6 and fault[5] != f"rank{os.environ.get('RANK', '0')}":
        return
    if (str(stage), str(epoch), str(batch)) == tuple(fault[2:5]):
        os.kill(os.getpid(), signal.SIGKILL if fault[0] == "kill" else signal.SIGTERM)


def _fault_write(name: str, action: str) -> bool:
    """Whether the write fault ``action`` (``kill`` / ``enospc``) targets this write of ``name``."""
    fault = _fault()
    if fault is None or fault[0] != action or len(fault) not in (3, 4) or fault[1:3] != ["write", name]:
        return False
    if len(fault) == 4 and not fault[3].isdigit():
        raise ValueError(f"{FAULT_ENV}={':'.join(fault)!r}: the write's number must be a whole number")
    return _WRITES.get((os.getpid(), name), 0) == (int(fault[3]) if len(fault) == 4 else 1)


class _Handle:
    """The temporary file as the writer sees it: remembers the first ``OSError`` of a write (torch's
    zip writer reports it as a ``RuntimeError`` that has lost the cause), and fails part-way under
    an ``enospc`` fault."""

    def __init__(self, raw: BinaryIO, full_after: int | None) -> None:
        self.raw = raw
        self.error: OSError | None = None
        self._left = full_after

    def write(self, data: Any) -> int:
        try:
            size = len(memoryview(data))
            if self._left is not None:
                if size > self._left:
                    self.raw.write(memoryview(data)[: self._left])
                    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV})")
                self._left -= size
            return self.raw.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.raw.flush()

    # A seekable, writable file as a plain ``open(path, "wb")`` is: a zip writer (np.savez) seeks
    # back to fill in each member's sizes, pyarrow's Parquet writer checks ``closed`` and ``mode``.
    mode = "wb"

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # np.savez takes a file object by its read attribute
        return self.raw.read(size)


def _write_error(dest: Path, cause: OSError) -> WriteError:
    error = WriteError(f"cannot write {str(dest)!r}: {cause.strerror or cause}; nothing was written under "
                       "that name")
    error.errno = cause.errno
    error.reason = str(cause.strerror or cause)
    return error


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """``fsync`` a directory, so that a rename into it is durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None]) -> Path:
    """Write ``path`` atomically: ``write(handle)`` fills a temporary file, which is ``fsync``-ed and
    renamed over ``path``.

    Raises:
        WriteError: the bytes could not be written or made durable (the temporary file is removed;
            ``path`` keeps its previous content, or stays absent).
    """
    dest = Path(path)
    name = dest.name
    key = (os.getpid(), name)
    _WRITES[key] = _WRITES.get(key, 0) + 1
    full_after = 512 if _fault_write(name, "enospc") else None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise _write_error(dest, exc) from None
    try:
        # mkstemp creates the file 0600; the final file gets the mode a plain open() would give
        # it (0666 less the umask), as the run's other files have.
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError:
        pass  # a file system without modes (some network mounts): the write itself is what matters
    handle: _Handle | None = None
    try:
        with os.fdopen(fd, "wb") as raw:
            handle = _Handle(raw, full_after)
            write(handle)
            raw.flush()
            if full_after is not None:  # a file smaller than the injected room fails at fsync,
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV})")
            os.fsync(raw.fileno())
        if _fault_write(name, "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, dest)
    except (OSError, RuntimeError) as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = handle.error if handle is not None and handle.error is not None else exc
        if not isinstance(cause, OSError):
            raise
        raise _write_error(dest, cause) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    _log_write(dest)
    return dest


def _log_write(dest: Path) -> None:
    """Append ``dest`` to the test-only write log (``MOEFAST_TEST_WRITE_LOG``), when set."""
    log = os.environ.get(WRITE_LOG_ENV)
    if not log:
        return
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (str(dest.resolve()) + "\n").encode())  # one O_APPEND write: whole lines
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return write_bytes(path, text.encode(encoding))


def write_frame(path: str | os.PathLike[str], frame: Any) -> Path:
    """Write the pandas DataFrame ``frame`` atomically, without its index: Parquet when ``path``
    ends in ``.parquet``, else CSV."""
    if Path(path).suffix == ".parquet":
        return atomic_write(path, lambda handle: frame.to_parquet(handle, index=False))
    return write_text(path, frame.to_csv(index=False))


def write_batches(path: str | os.PathLike[str], batches: Iterable[Any]) -> Path:
    """Write Arrow record batches to ``path`` atomically, each as it arrives (``batches`` may
    compute them): one batch is held at a time, never the whole table. Parquet when ``path``
    ends in ``.parquet``, else CSV written as :func:`write_frame` writes a frame of the same
    columns (pandas' text for every value; the header once). An empty iterable writes nothing
    and raises ``ValueError`` (a file needs a schema)."""
    import pyarrow.parquet as pq

    parquet = Path(path).suffix == ".parquet"

    def fill(handle: Any) -> None:
        writer = None
        started = False
        try:
            for batch in batches:
                if not parquet:
                    handle.write(batch.to_pandas().to_csv(index=False, header=not started).encode("utf-8"))
                elif writer is None:
                    writer = pq.ParquetWriter(handle, batch.schema)
                if writer is not None:
                    writer.write_batch(batch)
                started = True
        finally:
            if writer is not None:
                writer.close()
        if not started:
            raise ValueError(f"{path}: no record batch to write (a file needs a schema)")

    return atomic_write(path, fill)


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, Any]) -> Path:
    """``np.savez`` of ``arrays`` (uncompressed), atomically."""
    import numpy as np

    return atomic_write(path, lambda handle: np.savez(handle, **arrays))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, never a window): the one set-up of
    every plot moefast draws, which :func:`save_figure` then writes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a matplotlib figure as PNG (100 dpi), atomically."""
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))


def copy_file(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy the bytes of the file ``src`` to ``dest`` atomically (not its mode or times)."""
    with open(src, "rb") as source:
        return atomic_write(dest, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))


def write_at_path(path: str | os.PathLike[str], fill: Callable[[Path], object]) -> Path:
    """Write ``path`` atomically with a writer that only takes a path: ``fill(tmp)`` writes the
    file ``tmp``, which has ``path``'s name, in a temporary folder beside ``path``
    (``.<name>.<random>.tmp``); it is ``fsync``-ed and renamed over ``path``. The fault points
    and the errors are :func:`atomic_write`'s (an ``enospc`` fault fails at the ``fsync``).

    Raises:
        WriteError: the file could not be written or made durable, or ``fill`` left no file.
    """
    dest = Path(path)
    name = dest.name
    key = (os.getpid(), name)
    _WRITES[key] = _WRITES.get(key, 0) + 1
    full = _fault_write(name, "enospc")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise _write_error(dest, exc) from None
    try:
        tmp = scratch / name
        fill(tmp)
        if not tmp.is_file():
            raise OSError(errno.ENOENT, "the writer left no file")
        if full:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV})")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if _fault_write(name, "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, dest)
    except OSError as exc:
        raise _write_error(dest, exc) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fsync_dir(dest.parent)
    _log_write(dest)
    return dest


class _NonFinite(ValueError):
    """``NaN`` / ``Infinity`` in a file read with ``allow_nan=False``."""


def _refuse_constant(name: str) -> Any:
    """``json.loads``' hook for ``NaN`` / ``Infinity``, which Python accepts and JSON does not."""
    raise _NonFinite(name)


def read_json(path: Path, what: str, *, expect: type | None = None, allow_nan: bool = True) -> Any:
    """The one reader of the JSON files moefast writes (records, metrics, sidecars, vocabularies).

    ``allow_nan=False`` refuses ``NaN`` and ``Infinity``, which Python reads and JSON does not
    have (a file written with ``json.dumps(..., allow_nan=False)`` never holds them).

    Raises:
        ValueError: naming the file and ``what`` it is: missing or unreadable, not utf-8, damaged
            (edited, or cut by a disk that filled before writes were atomic; with the line), holding
            a non-finite number under ``allow_nan=False``, or not of the type ``expect``
            (``dict``: a JSON object).
    """
    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text) if allow_nan else json.loads(text, parse_constant=_refuse_constant)
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not utf-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is damaged: {exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno}") from None
    except _NonFinite as exc:
        raise ValueError(f"{what} {str(path)!r} is damaged: {exc} is not a JSON value (a non-finite "
                         "number)") from None
    if expect is not None and not isinstance(value, expect):
        raise ValueError(f"{what} {str(path)!r} is not a JSON {'object' if expect is dict else expect.__name__}")
    return value
