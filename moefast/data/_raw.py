"""Helpers shared by the raw-file loaders: located errors, '::' files, contiguous ids."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["RawFormatError", "contiguous", "need_dir", "need_file", "read_dat"]


class RawFormatError(ValueError):
    """Bad raw input; the message names the file, the line (1-based) and the field."""

    def __init__(self, path: Path, line: int | None, field: str | None, problem: str) -> None:
        where = str(path) + (f", line {line}" if line is not None else "")
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")
        self.path, self.line, self.field = path, line, field


def need_dir(raw_dir: str | os.PathLike[str] | None, source: str) -> Path:
    if raw_dir is None:
        raise ValueError(f"dataset {source!r} needs raw_dir=<directory holding its raw files>")
    path = Path(raw_dir)
    if not path.is_dir():
        raise ValueError(f"dataset {source!r}: raw_dir {str(path)!r} is not a directory")
    return path


def need_file(raw_dir: Path, name: str, source: str) -> Path:
    path = raw_dir / name
    if not path.is_file():
        raise ValueError(f"dataset {source!r}: missing raw file {str(path)!r}")
    return path


def _scan_dat(path: Path, text: str, names: Sequence[str], int_fields: Sequence[str]) -> list[list[str]]:
    """Line-by-line parse that raises a :class:`RawFormatError` at the first bad line."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split("::")
        if len(parts) != len(names):
            raise RawFormatError(path, number, None,
                                 f"expected {len(names)} '::'-separated fields {list(names)}, got {len(parts)}: {line!r}")
        for name, value in zip(names, parts, strict=True):
            if name in int_fields:
                try:
                    int(value)
                except ValueError:
                    raise RawFormatError(path, number, name, f"not an integer: {value!r}") from None
        rows.append(parts)
    return rows


def read_dat(path: Path, names: Sequence[str], int_fields: Sequence[str], encoding: str) -> pd.DataFrame:
    """Read a MovieLens ``::``-separated file; ``int_fields`` become int64 columns.

    All-integer files (``ratings.dat``, a million lines) take pandas' C parser, ``::`` rewritten
    to a tab; on any failure, and for files with text fields, the file is scanned line by line so
    that an error names the line and field.
    """
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RawFormatError(path, line, None, f"not {encoding} text: {e.reason}") from None
    all_int = set(int_fields) == set(names)
    if all_int and "\t" not in text and "\n\n" not in text and not text.startswith("\n"):
        try:
            frame = pd.read_csv(io.StringIO(text.replace("::", "\t")), sep="\t", header=None,
                                names=list(names), dtype=np.int64, engine="c")
            if len(frame) == text.count("\n") + (0 if text.endswith("\n") or not text else 1):
                return frame
        except (ValueError, pd.errors.ParserError):
            pass
    rows = _scan_dat(path, text, names, int_fields)
    frame = pd.DataFrame(rows, columns=list(names))
    for n in int_fields:
        frame[n] = frame[n].astype(np.int64)
    return frame


def contiguous(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, uniques)``: ids in ``[0, len(uniques))`` following the sorted unique values."""
    uniques, ids = np.unique(values, return_inverse=True)
    return ids.astype(np.int64), uniques
