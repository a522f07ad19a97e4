"""Atomic file writes, and the test-only fault points that exercise them.

Every file a run writes under its final name (checkpoints, the resume snapshot, ``metrics.json``,
predictions, ``config.json``) goes through :func:`atomic_write`: the bytes go to a temporary file
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
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["FAULT_ENV", "WriteError", "atomic_write", "fault_step", "fsync_dir"]

FAULT_ENV = "MOEFAST_TEST_FAULT"

# Writes this process made per file name, for the ``:<n>`` of a write fault (keyed by pid too: a
# forked child counts its own writes).
_WRITES: dict[tuple[int, str], int] = {}


class WriteError(OSError):
    """A file could not be written (disk full, permissions, I/O error); nothing was left under its
    final name. ``errno`` is the underlying error's."""


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


def _write_error(dest: Path, cause: OSError) -> WriteError:
    error = WriteError(f"cannot write {str(dest)!r}: {cause.strerror or cause}; nothing was written under "
                       "that name")
    error.errno = cause.errno
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
    return dest
