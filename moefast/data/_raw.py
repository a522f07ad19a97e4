"""Helpers shared by the raw-file loaders: located errors, the strict integer grammar, text
checks, '::' files, contiguous ids."""

from __future__ import annotations

import codecs
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "INT64_MAX",
    "BadInteger",
    "RawFormatError",
    "check_text",
    "contiguous",
    "int_problem",
    "need_dir",
    "need_file",
    "parse_int_column",
    "read_dat",
]

INT64_MAX = 2**63 - 1
# Up to 18 digits always fit in int64 (10**18 - 1 < 2**63 - 1); 19 or more need a comparison.
_SAFE_DIGITS = 18
_TEXT_CHUNK = 1 << 20


class RawFormatError(ValueError):
    """Bad raw input; the message names the file, the line (1-based) and the field."""

    def __init__(self, path: Path, line: int | None, field: str | None, problem: str) -> None:
        where = str(path) + (f", line {line}" if line is not None else "")
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")
        self.path, self.line, self.field = path, line, field


class BadInteger(ValueError):
    """``values[index]`` of a column is not a strict integer (:func:`int_problem` says why).

    It names no file or line: the loader that parsed the column turns it into a
    :class:`RawFormatError` that does.
    """

    def __init__(self, index: int, value: object, problem: str) -> None:
        super().__init__(f"{problem}: {value!r}")
        self.index, self.value, self.problem = index, value, problem


def int_problem(text: object) -> str | None:
    """Why ``text`` is not an integer field of a raw file, or ``None`` when it is one.

    The one grammar of every integer column of every loader (ids, ratings, timestamps, codes):
    one or more ASCII digits 0-9 and nothing else, at most ``2**63 - 1``. Refused although
    Python's ``int`` or pandas would read a number from them: a sign (``+5``, ``-5``), spaces
    (`` 5``), ``1_0``, ``5.0``, ``4.9999999999999999``, ``1e1``, ``0x5``, non-ASCII digits, and
    anything int64 cannot hold. No column of these datasets' documented formats is negative.
    """
    if text is None or text == "" or (isinstance(text, float) and text != text):  # a NaN: a missing field
        return "empty, not an integer"
    if not isinstance(text, str):
        return f"not text ({type(text).__name__})"
    if not (text.isascii() and text.isdigit()):
        return "not an integer (ASCII digits 0-9 only: no sign, space, '_', '.', exponent or prefix)"
    if len(text) > _SAFE_DIGITS and int(text) > INT64_MAX:
        return f"integer too large for int64 (above {INT64_MAX})"
    return None


def _digit_fields(buf: np.ndarray, columns: int) -> int | None:
    """Rows of ``buf`` (uint8 text: fields split by tab, rows by newline, a final newline
    optional) when every row holds ``columns`` fields of 1 to 18 ASCII digits; else ``None``.

    Vectorised: ``None`` sends the caller to the field-by-field check, which names the first bad
    line. Fields this accepts are strict integers that int64 holds exactly, so a fast parser can
    read nothing else into them.
    """
    if buf.size == 0:
        return None
    if buf[-1] != ord("\n"):
        buf = np.concatenate([buf, np.array([ord("\n")], np.uint8)])
    digit = (buf >= ord("0")) & (buf <= ord("9"))
    tab, newline = buf == ord("\t"), buf == ord("\n")
    if not bool((digit | tab | newline).all()):
        return None
    bounds = np.flatnonzero(tab | newline)
    lengths = np.diff(bounds, prepend=-1) - 1
    if not (bool((lengths >= 1).all()) and bool((lengths <= _SAFE_DIGITS).all())):
        return None
    tabs_before = np.cumsum(tab)[newline]  # tabs up to each row's end
    if not bool((np.diff(tabs_before, prepend=0) == columns - 1).all()):
        return None
    return int(tabs_before.size)


def parse_int_column(values: Iterable[object]) -> np.ndarray:
    """``int64 [n]`` from the text fields ``values`` (a sequence, a pandas Series or a pyarrow
    string array) under :func:`int_problem`'s grammar.

    A column whose every field is 1 to 18 ASCII digits (checked vectorised) is cast by Arrow,
    which reads exactly these integers (a million ids in about 0.05 s); any other column is
    checked field by field.

    Raises:
        BadInteger: at the first value (by index) that is not a strict integer.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    items: list[object] | None = None
    column: pa.Array | pa.ChunkedArray | None
    if isinstance(values, pa.Array | pa.ChunkedArray):
        column = values
    else:
        if not isinstance(values, pd.Series):
            items = list(values)
        try:
            column = pa.array(values if items is None else items, type=pa.string(), from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # a value that is not text
            column = None
    if column is not None and pa.types.is_string(column.type) and len(column) and column.null_count == 0:
        plain = pc.and_(pc.ascii_is_decimal(column), pc.less_equal(pc.binary_length(column), _SAFE_DIGITS))
        if pc.all(plain).as_py():
            return np.asarray(pc.cast(column, pa.int64()).to_numpy(), dtype=np.int64)
    if items is None:
        items = values.tolist() if isinstance(values, pd.Series) else column.to_pylist()  # type: ignore[union-attr]
    texts: list[str] = []
    for index, value in enumerate(items):
        problem = int_problem(value)
        if problem is not None:
            raise BadInteger(index, value, problem)
        texts.append(str(value))
    return np.array([int(v) for v in texts], dtype=np.int64)


def check_text(path: Path, encoding: str) -> None:
    """Raise a :class:`RawFormatError` naming the line if ``path`` is not valid ``encoding`` text.

    Reads the file in 1 MiB chunks: a latin-1 byte in a UTF-8 log is found without holding the
    file in memory, and reported with its line and byte column instead of a codec traceback.
    """
    decoder = codecs.getincrementaldecoder(encoding)()
    lines_before = 0
    since_newline = 0  # bytes read after the last newline, before this chunk
    with path.open("rb") as f:
        while True:
            chunk = f.read(_TEXT_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.object is the decoder's pending bytes (the start of a character cut by the
                # previous chunk, never a newline) plus this chunk; e.start indexes into it.
                head = e.object[: e.start]
                line = lines_before + head.count(b"\n") + 1
                pending = len(e.object) - len(chunk)
                column = e.start - head.rfind(b"\n") if b"\n" in head else since_newline - pending + e.start + 1
                raise RawFormatError(path, line, None, f"not {encoding} text: byte {e.object[e.start]:#04x} "
                                     f"at byte {column} of the line ({e.reason})") from None
            if not chunk:
                return
            newlines = chunk.count(b"\n")
            lines_before += newlines
            since_newline = len(chunk) - chunk.rfind(b"\n") - 1 if newlines else since_newline + len(chunk)


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


def _scan_dat(path: Path, text: str, names: Sequence[str], int_fields: Sequence[str]) -> list[list[object]]:
    """Line-by-line parse that raises a :class:`RawFormatError` at the first bad line.

    Lines end at ``\\n`` only (``str.splitlines`` would also split an ISO-8859-1 title at
    ``\\x85`` or ``\\x1c``); a ``\\r`` before it is dropped.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    int_positions = [k for k, name in enumerate(names) if name in int_fields]
    rows: list[list[object]] = []
    for number, line in enumerate(lines, 1):
        parts: list[object] = list(line.removesuffix("\r").split("::"))
        if len(parts) != len(names):
            raise RawFormatError(path, number, None,
                                 f"expected {len(names)} '::'-separated fields {list(names)}, got {len(parts)}: {line!r}")
        for k in int_positions:
            problem = int_problem(parts[k])
            if problem is not None:
                raise RawFormatError(path, number, names[k], f"{problem}: {parts[k]!r}")
            parts[k] = int(parts[k])  # type: ignore[call-overload]
        rows.append(parts)
    return rows


def read_dat(path: Path, names: Sequence[str], int_fields: Sequence[str], encoding: str) -> pd.DataFrame:
    """Read a MovieLens ``::``-separated file; ``int_fields`` become int64 columns.

    Every integer field follows :func:`int_problem`'s grammar. An all-integer file (``ratings.dat``,
    a million lines) whose bytes are plain digit fields (checked vectorised) takes pandas' C
    parser; any other file, and any file that fails that check, is scanned line by line, so that
    an error names the line and field.
    """
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RawFormatError(path, line, None, f"not {encoding} text: {e.reason}") from None
    if set(int_fields) == set(names):
        tabbed = data.replace(b"::", b"\t")
        rows = _digit_fields(np.frombuffer(tabbed, np.uint8), len(names))
        if rows is not None:
            frame = pd.read_csv(io.BytesIO(tabbed), sep="\t", header=None, names=list(names),
                                dtype=np.int64, engine="c", index_col=False)
            if len(frame) == rows:
                return frame
    table = _scan_dat(path, text, names, int_fields)
    frame = pd.DataFrame(table, columns=list(names))
    for n in int_fields:
        frame[n] = frame[n].astype(np.int64)
    return frame


def contiguous(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, uniques)``: ids in ``[0, len(uniques))`` following the sorted unique values."""
    uniques, ids = np.unique(values, return_inverse=True)
    return ids.astype(np.int64), uniques
