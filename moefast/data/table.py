"""The tabular source: your own click log (CSV / TSV, gzip or not, Parquet, or folders of parts).

``load_table(path=..., schema=...)`` (``moefast.data.load("table", ...)``) reads the columns the
:class:`~moefast.data.schema.TableSchema` names with pyarrow, in chunks (a CSV block or a
Parquet batch at a time, behind a tqdm bar), and builds a :class:`MultiDomainDataset`. Parquet
is read through ``pyarrow.dataset`` (:func:`parquet_dataset`, :func:`fragment_chunks`), the
reading layer the streamed source (:mod:`moefast.data.stream`) shares:

1. each chunk's columns become integer codes at once (pyarrow's dictionary encoding; only a
   chunk's distinct values ever exist as Python objects), numbers are parsed strictly;
2. after the last chunk, every field's per-chunk dictionaries are merged into one, the domain
   policies apply, rows are split, vocabularies are counted on the **training** rows only, and
   the numeric statistics are taken on them;
3. the codes are mapped to final ids (``moefast.data.vocab`` documents the reserved ids).

What is held in memory (the memory model, ``docs/data.md``): per row, 4 bytes per single-valued
field and ``4 * max_len`` per multi-valued one while reading, 8 bytes per numeric value, then
the final dataset's 8 bytes per id (``8 * width`` for a bag) and 4 per numeric value, label and
domain; plus each field's distinct values once. The input is never held whole.

Errors name the file, the row (1-based data row; the header is not a row) and the column.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from moefast.config import FeatureSpec, NumericSpec, Pooling
from moefast.data import cache
from moefast.data.dataset import MultiDomainDataset, Split
from moefast.data.schema import (
    DOMAIN_FIELD,
    HASH_SPLIT_BUCKETS,
    MAX_TABLE_BYTES,
    CategoricalColumn,
    DomainPolicy,
    MissingPolicy,
    SplitKind,
    TableSchema,
    Transform,
    human_bytes,
    load_schema,
    table_bytes,
)
from moefast.data.splits import assign_splits
from moefast.data.vocab import (
    FORMAT,
    HASH_NAME,
    MISSING_ID,
    OOV_ID,
    PADDING_ID,
    RESERVED,
    VERSION,
    hash_ids,
    read_vocab,
    write_vocab,
)
from moefast.log import progress_bar

__all__ = ["TableError", "input_files", "load_table", "save_vocab"]

_CSV_EXT = (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".txt", ".txt.gz")
_PARQUET_EXT = (".parquet", ".pq")
CSV_BLOCK_BYTES = 16 << 20
HEADER_BYTES = 16 << 20  # a "header" longer than this (a file without line breaks) is cut here
PARQUET_BATCH_ROWS = 1 << 18


class TableError(ValueError):
    """Bad tabular input: the message names the file, the row and the column."""

    def __init__(self, path: Path | str, row: int | None, column: str | None, problem: str) -> None:
        where = str(path) + (f", row {row}" if row is not None else "")
        what = f", column {column!r}" if column else ""
        super().__init__(f"{where}{what}: {problem}")
        self.path, self.row, self.column = str(path), row, column


# ----------------------------------------------------------------------------------------------
# Files and chunks


def input_files(path: str | os.PathLike[str]) -> tuple[list[Path], str]:
    """``(files, "csv" | "parquet")`` for a file or a folder of part files (hidden files and
    ``_SUCCESS``-style markers skipped; extension-less parts, as Hive writes them, are CSV).

    A folder may hold Hive-style partition folders (``dt=2024-01-01/part-0.parquet``, nested to
    any depth), read in sorted order; each file's partition values are
    :func:`partition_values`. Any other subfolder is refused: its files would be left out.
    """
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = []
        _collect(p, p, files)
        if not files:
            raise ValueError(f"table data folder {str(p)!r} holds no part files")
        keys = {tuple(partition_values(p, f)) for f in files}
        if len(keys) > 1:
            raise ValueError(f"table data folder {str(p)!r}: its partition folders name different keys "
                             f"({' / '.join(', '.join(k) or '(none)' for k in sorted(keys))})")
    else:
        raise ValueError(f"table data {str(p)!r} does not exist")
    kinds = set()
    for f in files:
        name = f.name.lower()
        if name.endswith(_PARQUET_EXT):
            kinds.add("parquet")
        elif name.endswith(_CSV_EXT) or "." not in name:
            kinds.add("csv")
        else:
            raise ValueError(f"{f}: unknown table format (expected .csv, .tsv (optionally .gz) or .parquet)")
    if len(kinds) > 1:
        raise ValueError(f"table data folder {str(p)!r} mixes CSV and Parquet part files")
    return files, kinds.pop()


def _collect(root: Path, folder: Path, files: list[Path]) -> None:
    """The part files under ``folder``, in sorted order, into ``files``."""
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith((".", "_")) or entry.name.endswith(".crc"):
            continue  # hidden files, _SUCCESS, _temporary/, Spark's checksums
        if entry.is_dir():
            where = str(entry.relative_to(root))
            if entry.is_symlink():  # could loop back up the tree, or read a folder twice
                raise ValueError(f"table data folder {str(root)!r}: {where!r} is a link to a folder; "
                                 "partition folders must be real folders")
            raw_key, eq, _ = entry.name.partition("=")
            key = unquote(raw_key)
            if not eq or not key:
                raise ValueError(f"table data folder {str(root)!r} holds the folder {where!r}, "
                                 "which is neither a part file nor a Hive partition (key=value); move it out")
            # Compared after percent-decoding (s%69te is site): the values are decoded too.
            above = [unquote(part.partition("=")[0]) for part in entry.relative_to(root).parent.parts]
            if key in above:
                raise ValueError(f"table data folder {str(root)!r}: {where!r} names the partition key {key!r} twice"
                                 + (f" ({raw_key!r} decodes to {key!r})" if raw_key != key else ""))
            _collect(root, entry, files)
        elif entry.is_file():
            files.append(entry)


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


@functools.lru_cache(maxsize=64)
def _hive(keys: tuple[str, ...]) -> Any:
    """``pyarrow.dataset``'s Hive partitioning of the keys ``keys``, every value read as text
    (``dt=2026-11-28`` stays the text it is written as, never a date or a number)."""
    import pyarrow.dataset as ds

    return ds.partitioning(pa.schema([(k, pa.string()) for k in keys]), flavor="hive")


def hive_partitioning(root: Path, file: Path) -> Any:
    """The Hive partitioning (``pyarrow.dataset``) of the partition folders above ``file`` under
    ``root`` (every file of a folder names the same keys: :func:`input_files`), or None."""
    if file == root:
        return None
    keys = tuple(unquote(part.partition("=")[0]) for part in file.parent.relative_to(root).parts)
    return _hive(keys) if keys else None


def partition_values(root: Path, file: Path) -> dict[str, str | None]:
    """The Hive partition values of ``file`` under the folder ``root``: ``{key: value}`` from
    each ``key=value`` folder on its path, as ``pyarrow.dataset(partitioning="hive")`` parses
    them (percent-escapes decoded); ``__HIVE_DEFAULT_PARTITION__`` and an empty value are
    missing. A value that is not UTF-8 once decoded is a :class:`TableError` naming the folder."""
    partitioning = hive_partitioning(root, file)
    if partitioning is None:
        return {}
    try:  # the file's path under the folder: its last segment is the file's name, no partition
        return partition_keys(partitioning.parse(file.relative_to(root).as_posix()), partitioning)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        detail = str(exc).strip().splitlines()[0]
        raise TableError(file.parent, None, None, f"a partition folder's name cannot be read ({detail})") from None


def partition_keys(expression: Any, partitioning: Any) -> dict[str, str | None]:
    """``{key: value}`` of a fragment's partition expression (pyarrow.dataset), every key of
    ``partitioning`` in its order; an empty value is missing, like an empty CSV field."""
    import pyarrow.dataset as ds

    found = ds.get_partition_keys(expression)
    # An empty value (what pyarrow writes for "") is missing, like an empty CSV field.
    return {k: (found.get(k) or None) for k in partitioning.schema.names}


def parquet_dataset(files: list[Path], root: Path | None, coded: set[str] | frozenset[str] = frozenset()) -> Any:
    """``files`` (in this order) as one ``pyarrow.dataset`` of Parquet fragments, their Hive
    partition folders under ``root`` parsed by pyarrow. Parquet string columns in ``coded``
    are read as dictionary arrays (the file's own dictionary pages become the codes, each
    distinct string decoded once per row group: a 1M-row, 22-field file loaded 1.5x faster);
    other columns named there (numbers) are read as they are. Nothing is read here: the
    footers are read when a fragment is first asked for them (:func:`footer`)."""
    import pyarrow.dataset as ds

    fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=set(coded)))
    partitioning = hive_partitioning(root, files[0]) if root is not None and files else None
    # An explicit dataset schema, the partition keys only: no file is opened to infer one, and a
    # filter on a key prunes files. Each fragment is read with its own footer's schema (a file's
    # columns are checked where it is read).
    schema = pa.schema([]) if partitioning is None else partitioning.schema
    try:
        return ds.dataset([str(f) for f in files], schema=schema, format=fmt, partitioning=partitioning,
                          partition_base_dir=None if root is None else str(root))
    except pa.ArrowInvalid:
        if root is not None:
            for f in files:  # the folder whose name pyarrow cannot parse, located
                partition_values(root, f)
        raise


def footer(fragment: Any, path: Path) -> Any:
    """The Parquet footer (``FileMetaData``) of a file's fragment, read once and kept by it; a
    file that is not Parquet (truncated, damaged, gone) is a :class:`TableError` naming it."""
    try:
        fragment.ensure_complete_metadata()
        return fragment.metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise TableError(path, None, None, f"not a readable Parquet file ({exc})") from None


@dataclass
class _Chunk:
    path: Path
    first_row: int  # 1-based data row of the chunk's first row in its file
    columns: dict[str, pa.Array]


def _csv_delimiter(path: Path) -> str:
    return "\t" if ".tsv" in path.name.lower() else ","


def _csv_parse_options(path: Path) -> Any:
    """pyarrow's CSV parse options for ``path`` (its delimiter). A quoted field may hold a line
    break: without ``newlines_in_values`` the parse failed or not depending on where a block
    ended. It cost nothing measurable (26 columns, 1M rows: 1.96-2.01 s either way)."""
    import pyarrow.csv as pacsv

    return pacsv.ParseOptions(delimiter=_csv_delimiter(path), newlines_in_values=True)


def _unreadable(path: Path, exc: BaseException, rows: int | None = None) -> TableError:
    """A file the reader cannot decompress or read (a truncated ``.gz``, a plain file named
    ``.gz``, an I/O error), located after the last data row read."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    gz = path.name.lower().endswith(".gz")
    what = "not a readable gzip file (truncated, damaged, or not gzip)" if gz else "cannot be read"
    after = f" after data row {rows}" if rows else ""
    return TableError(path, None, None, f"{what}{after}: {detail}")


def _csv_header(path: Path) -> list[str]:
    """The header's column names: read as bytes and decoded as UTF-8 (a byte-order mark skipped),
    so that a bad byte further down is reported at its row, not here."""
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            raw = b""
            while b"\n" not in raw and len(raw) < HEADER_BYTES:
                block = stream.read(1 << 16)
                if not block:
                    break
                raw += block
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(path, exc) from None
    raw = raw.split(b"\n", 1)[0]
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TableError(path, None, None, f"the header is not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte "
                                           f"{exc.start + 1} of the line (save the file as UTF-8)") from None
    return next(csv.reader([line], delimiter=_csv_delimiter(path)), [])


def check_header(path: Path, header: list[str], columns: list[str]) -> None:
    """A column the schema reads must be named once: with two, which one is meant is a guess."""
    twice = [c for c in columns if header.count(c) > 1]
    if twice:
        raise TableError(path, None, twice[0], f"named {header.count(twice[0])} times in the header: which one "
                                               "the schema means is ambiguous; rename or drop the others")


def _chunks(files: list[Path], kind: str, columns: list[str], optional: set[str],
            coded: set[str] | frozenset[str] = frozenset(), root: Path | None = None) -> Iterator[_Chunk]:
    """Every chunk of every file, with only ``columns`` (``optional`` ones may be absent).

    Under a folder ``root``, a column the files lack may come from their Hive partition folders
    (``key=value``): one value for the whole file, as text. A column in both is refused.

    Parquet files are read as one ``pyarrow.dataset`` (:func:`parquet_dataset`), a fragment per
    file (:func:`fragment_chunks`, which the streamed source calls on one row group's fragment);
    columns in ``coded`` come out as dictionary arrays (the file's own dictionary pages for
    Parquet, the reader's dictionary encoding for CSV).
    """
    if kind == "parquet":
        dataset = parquet_dataset(files, root, coded)
        partitioning = dataset.partitioning
        for path, fragment in zip(files, dataset.get_fragments(), strict=True):
            partition = {} if partitioning is None else partition_keys(fragment.partition_expression, partitioning)
            yield from fragment_chunks(fragment, path, 1, columns, optional, coded, partition)
        return
    import pyarrow.csv as pacsv

    for path in files:
        header = _csv_header(path)
        have, constant = _columns_of(path, header, columns, optional,
                                     partition_values(root, path) if root is not None else {})
        row = 1
        try:
            reader = pacsv.open_csv(
                str(path),
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                parse_options=_csv_parse_options(path),
                convert_options=pacsv.ConvertOptions(
                    include_columns=have,
                    # Coded columns come out dictionary-encoded by the reader's own threads.
                    column_types={c: pa.dictionary(pa.int32(), pa.string()) if c in coded else pa.string()
                                  for c in have},
                    strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True),
            )
            for batch in reader:
                yield _Chunk(path, row, _with_constants(batch, have, constant, coded))
                row += batch.num_rows
        except pa.ArrowInvalid as exc:
            detail = str(exc).strip().splitlines()[0]
            if "UTF8" in detail or "UTF-8" in detail:
                raise _first_bad_text(path, header, have) from None
            bad = _first_malformed_row(path, len(header))
            raise TableError(path, bad, None, f"malformed CSV ({detail})") from None
        except (OSError, pa.ArrowException) as exc:
            raise _unreadable(path, exc, row - 1) from None


def _columns_of(path: Path, header: list[str], columns: list[str], optional: set[str],
                partition: Mapping[str, str | None]) -> tuple[list[str], dict[str, str | None]]:
    """``(the columns read from the file, the partition values standing in for columns)``:
    a column named twice, in the file and in a partition folder, or nowhere (unless
    ``optional``) is a :class:`TableError`."""
    check_header(path, header, columns)
    have = [c for c in columns if c in header]
    both = [c for c in columns if c in header and c in partition]
    if both:
        raise TableError(path, None, both[0], "is both a column of the file and a partition folder's key")
    constant = {c: partition[c] for c in columns if c in partition}
    missing = [c for c in columns if c not in header and c not in constant and c not in optional]
    if missing:
        raise TableError(path, None, missing[0], f"missing column (the file has {header})")
    return have, constant


def fragment_chunks(fragment: Any, path: Path, first_row: int, columns: list[str], optional: set[str] | frozenset[str],
                    coded: set[str] | frozenset[str], partition: Mapping[str, str | None]) -> Iterator[_Chunk]:
    """The chunks of one Parquet fragment of :func:`parquet_dataset` (a whole file, or one row
    group whose first row is data row ``first_row`` of ``path``), with only ``columns``, the
    fragment's Hive ``partition`` values standing in for the columns it lacks."""
    try:
        header = fragment.physical_schema.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise TableError(path, None, None, f"not a readable Parquet file ({exc})") from None
    have, constant = _columns_of(path, header, columns, set(optional), partition)
    row = first_row
    try:
        # No batch decoded ahead: one raw batch at a time, as the memory model says (the
        # streamed source's read-ahead thread overlaps reading with training instead).
        for batch in fragment.to_batches(columns=have, batch_size=PARQUET_BATCH_ROWS, batch_readahead=0,
                                         fragment_readahead=0):
            yield _Chunk(path, row, _with_constants(batch, have, constant, coded))
            row += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(path, None, None, f"not a readable Parquet file after data row {row - 1} "
                                           f"({detail})") from None


def _with_constants(batch: pa.RecordBatch, have: list[str], constant: Mapping[str, str | None],
                    coded: set[str] | frozenset[str]) -> dict[str, pa.Array]:
    """The batch's columns ``have``, and one column per partition value repeated over its rows
    (dictionary-encoded where the file's own column would be)."""
    columns = {c: batch.column(c) for c in have}
    for name, value in constant.items():
        if name in coded:
            columns[name] = pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(batch.num_rows, dtype=np.int32), mask=None if value is not None
                         else np.ones(batch.num_rows, dtype=bool)), pa.array([value or ""], pa.string()))
        else:
            columns[name] = pa.array([value] * batch.num_rows, pa.string())
    return columns


def _first_malformed_row(path: Path, width: int) -> int | None:
    """The first data row whose field count is not the header's (the slow path of an error)."""
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
            for number, fields in enumerate(csv.reader(text, delimiter=_csv_delimiter(path))):
                if number and len(fields) != width:
                    return number
    except (OSError, pa.ArrowException, csv.Error):
        return None
    return None


def _first_bad_text(path: Path, header: list[str], have: list[str]) -> TableError:
    """The error for bytes that are not UTF-8 in a column the schema reads: its row, column and
    byte (the slow path of an error: the file is read again with Python's csv module)."""
    wanted = {header.index(c) for c in have if c in header}
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
            for number, fields in enumerate(csv.reader(text, delimiter=_csv_delimiter(path))):
                if not number:
                    continue
                for k, value in enumerate(fields):
                    bad = next((ch for ch in value if "\udc80" <= ch <= "\udcff"), None)
                    if bad is not None and k in wanted:
                        byte = ord(bad) - 0xDC00
                        return TableError(path, number, header[k], f"not UTF-8 text: byte 0x{byte:02x} in "
                                          f"{value.encode('utf-8', 'surrogateescape')!r} (save the file as UTF-8)")
    except (OSError, pa.ArrowException, csv.Error):
        pass
    return TableError(path, None, None, "not UTF-8 text (save the file as UTF-8)")


# ----------------------------------------------------------------------------------------------
# Column conversions (one chunk)


def _first_failure(arr: pa.Array, convert: Any) -> int:
    """Index of the first element on which ``convert`` (a pyarrow cast) fails: binary search."""
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(arr.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    return lo


def _as_float(chunk: _Chunk, column: str) -> np.ndarray:
    """float64 ``[n]``, NaN where null; a non-number is a :class:`TableError` at its row."""
    arr = chunk.columns[column]
    if pa.types.is_dictionary(arr.type):  # a column read as a categorical field too
        arr = arr.dictionary_decode()
    if pa.types.is_boolean(arr.type):
        arr = arr.cast(pa.int8())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = pc.utf8_trim_whitespace(arr)

    def convert(a: pa.Array) -> pa.Array:
        return pc.cast(a, pa.float64())

    try:
        out = convert(arr)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        i = _first_failure(arr, convert)
        raise TableError(chunk.path, chunk.first_row + i, column, f"not a number: {arr[i].as_py()!r}") from None
    values: np.ndarray = out.to_numpy(zero_copy_only=False)
    return values.astype(np.float64, copy=False)


def finite_floats(chunk: _Chunk, column: str) -> np.ndarray:
    """A numeric field's values in one chunk: float64 ``[n]``, NaN where missing; a value that
    is not a number or is infinite is a :class:`TableError` at its row. The one check of the
    in-memory load, the streamed first pass and the streamed source."""
    values = _as_float(chunk, column)
    bad = np.flatnonzero(np.isinf(values))
    if bad.size:
        i = int(bad[0])
        raise TableError(chunk.path, chunk.first_row + i, column, f"not a finite number: {values[i]}")
    return values


# Every integer up to 2**53 is a float64; above it neighbouring ids share one float.
_FLOAT_EXACT = 2.0**53


@dataclass(frozen=True)
class _Place:
    """Where an array's rows come from, for messages: element ``i`` is data row ``first_row +
    rows[i]`` (``rows`` None: ``+ i``) of ``path``, in ``column``."""

    path: Path
    first_row: int
    column: str
    rows: np.ndarray | None = None

    def error(self, i: int | None, problem: str) -> TableError:
        row = None if i is None else self.first_row + int(self.rows[i] if self.rows is not None else i)
        return TableError(self.path, row, self.column, problem)


def _as_text(arr: pa.Array, place: _Place | None = None) -> pa.Array:
    """``arr`` as UTF-8 text (ids are keyed by their text); ``place`` locates a value that has
    no faithful text: a float id that is NaN, infinite or above 2**53, bytes that are not UTF-8,
    a type that is not a scalar."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr
    where = place or _Place(Path("<data>"), 1, "?")
    if pa.types.is_floating(arr.type):
        x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(valid & ~np.isfinite(x))
        if bad.size:
            raise where.error(int(bad[0]), f"id {x[bad[0]]} is not a number (a float id column holds NaN or inf)")
        big = np.flatnonzero(valid & (np.abs(x) > _FLOAT_EXACT))
        if big.size:
            raise where.error(int(big[0]), f"float id {x[big[0]]:.17g} is above 2^53, where float64 cannot tell "
                                           "neighbouring ids apart; store ids as int64 or text")
        # A float column holding ids (1.0, 2.0) names them as integers; anything else as written.
        if bool(np.all(~valid | (x == np.floor(x)))):
            return pc.cast(pc.cast(arr, pa.int64(), safe=False), pa.string())
    try:
        return pc.cast(arr, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
            i = _first_failure(arr, lambda a: pc.cast(a, pa.string()))
            raise where.error(i, f"not UTF-8 text: {arr[i].as_py()!r}") from None
        detail = str(exc).strip().splitlines()[0]
        raise where.error(None, f"a column of type {arr.type} cannot be read as ids ({detail})") from None


def _trimmed(text: pa.Array) -> pa.Array:
    """Ids without leading or trailing whitespace (``" u5"`` is ``"u5"``; docs/data.md)."""
    return pc.utf8_trim_whitespace(text)


@dataclass
class _Codes:
    """One field's per-chunk codes: local indices into each chunk's dictionary."""

    local: list[np.ndarray] = field(default_factory=list)  # int32 [n_chunk] or [n_chunk, max_len]
    dicts: list[pa.Array] = field(default_factory=list)
    width: int = 0  # longest bag seen (multi-valued)

    def add_single(self, arr: pa.Array, place: _Place | None = None) -> np.ndarray:
        """Add one chunk's column; returns its local codes (-1: missing, an empty or
        whitespace-only value included)."""
        if pa.types.is_dictionary(arr.type) and not pa.types.is_string(arr.type.value_type):
            arr = arr.dictionary_decode()  # a Parquet file's own dictionary of numbers
        enc = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(_as_text(arr, place))
        values = _trimmed(enc.dictionary)
        local = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
        empty = np.flatnonzero(pc.equal(values, "").fill_null(True).to_numpy(zero_copy_only=False))
        if empty.size:
            local[np.isin(local, empty)] = -1
        self.dicts.append(values)
        self.local.append(local)
        return local

    def add_multi(self, arr: pa.Array, spec: CategoricalColumn, chunk: _Chunk) -> None:
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            lists = arr
        else:
            lists = pc.split_pattern(_as_text(arr, _Place(chunk.path, chunk.first_row, spec.column)),
                                     pattern=spec.delimiter)
        n = len(lists)
        flat = pc.list_flatten(lists)
        parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
        text = _trimmed(_as_text(flat, _Place(chunk.path, chunk.first_row, spec.column, parent)))
        keep = pc.and_(pc.is_valid(text), pc.not_equal(text, "")).fill_null(False)
        text = text.filter(keep)
        parent = parent[keep.to_numpy(zero_copy_only=False)]
        # Position inside the bag, counting only the kept items: rank minus the bag's first rank.
        pos = np.arange(parent.size) - np.searchsorted(parent, parent, side="left")
        take = pos < spec.max_len  # the stated rule: a bag keeps its first max_len items
        enc = pc.dictionary_encode(text.filter(pa.array(take)))
        self.dicts.append(enc.dictionary)
        local = np.full((n, spec.max_len), -2, dtype=np.int32)  # -2: padding
        local[parent[take], pos[take]] = enc.indices.to_numpy(zero_copy_only=False)
        if take.any():
            self.width = max(self.width, int(pos[take].max()) + 1)
        self.local.append(local)

    def merge(self) -> tuple[pa.Array, np.ndarray]:
        """``(uniques, codes)``: every distinct value once, and each row's index into it (-1
        missing, -2 padding), concatenated over chunks."""
        if not self.dicts:
            return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
        merged = pc.dictionary_encode(pa.concat_arrays([d.cast(pa.string()) for d in self.dicts]))
        glob = merged.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        parts, start = [], 0
        for local, d in zip(self.local, self.dicts, strict=True):
            g = glob[start:start + len(d)]
            start += len(d)
            out = np.where(local >= 0, g[np.maximum(local, 0)] if g.size else 0, local).astype(np.int64)
            parts.append(out)
        codes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return merged.dictionary, codes


# ----------------------------------------------------------------------------------------------
# The load


class _Rows:
    """Global row index -> (file, 1-based row) for messages."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.where: list[tuple[Path, int]] = []
        self.total = 0

    def add(self, chunk: _Chunk, n: int) -> None:
        self.starts.append(self.total)
        self.where.append((chunk.path, chunk.first_row))
        self.total += n

    def locate(self, index: int) -> tuple[Path, int]:
        k = int(np.searchsorted(np.asarray(self.starts), index, side="right")) - 1
        path, first = self.where[k]
        return path, first + index - self.starts[k]


def load_table(
    *,
    path: str | os.PathLike[str],
    schema: str | os.PathLike[str] | TableSchema | Mapping[str, Any],
    vocab_from: str | os.PathLike[str] | None = None,
    scoring: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool | None = None,
) -> MultiDomainDataset:
    """Load a click log described by ``schema`` (see :mod:`moefast.data.schema`).

    Args:
        path: a CSV / TSV file (``.gz`` allowed), a Parquet file, or a folder of part files.
        schema: a TOML file, a dict of the same shape, or a :class:`TableSchema`.
        vocab_from: a run directory (or its ``vocab.json``): its vocabularies, numeric
            statistics and domain map are applied unchanged instead of built.
        scoring: data without a label: every row lands in the ``test`` split with label 0, the
            schema's ``key`` column passes through to ``info["keys"]`` in row order. Implied by
            a schema without ``label``. Needs ``vocab_from``.
        cache_dir / use_cache: the processed dataset is cached (``moefast.data.cache``) keyed by
            the content of every input file, the schema and these options.
        progress: ``True`` draws the reading bar, ``False`` hides it; ``None`` (default) draws
            it under the run channel's rule (:func:`moefast.log.progress_bar`: on a terminal,
            with the channel configured and not quiet, as the command line does).

    ``info["table"]`` holds the vocabularies, statistics and domain map (the content of
    ``vocab.json``, :func:`save_vocab`); a cache hit carries the same.
    """
    sch = load_schema(schema)
    files, kind = input_files(path)
    scoring = scoring or sch.label is None
    saved: dict[str, Any] | None = None
    vocab_file: Path | None = None
    if vocab_from is not None:
        saved, vocab_file = read_vocab(vocab_from)
        _check_same_fields(sch, saved, vocab_file)
    if scoring and saved is None:
        raise ValueError("scoring data (no label) needs vocab_from=<the run directory whose model scores it>")
    extra = [Path(_pretrained_path(sch, c)) for c in sch.categorical if c.pretrained is not None]
    root = Path(path) if Path(path).is_dir() else None
    options: dict[str, Any] = {"schema": sch.to_dict(), "scoring": scoring, "kind": kind}
    if root is not None:
        # The files' places under the folder: the order of the rows, and the partition values.
        options["parts"] = [f.relative_to(root).as_posix() for f in files]
    inputs = files + extra + ([vocab_file] if vocab_file is not None else [])

    def build() -> MultiDomainDataset:
        return _build(sch, files, kind, saved, scoring, progress, root)

    if not use_cache:
        return build()
    return cache.cached("table", inputs, options, build, cache_dir)


def _check_same_fields(sch: TableSchema, saved: Mapping[str, Any], vocab_file: Path) -> None:
    """A reused vocabulary must describe the same fields: the model trained on them reads them."""
    mine, theirs = sch.to_dict(), saved.get("schema", {})
    for part in ("categorical", "numeric"):
        a, b = mine.get(part, {}), theirs.get(part, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                key = next((k for k in sorted(set(a.get(name, {})) | set(b.get(name, {})))
                            if a.get(name, {}).get(k) != b.get(name, {}).get(k)), None)
                raise ValueError(
                    f"{sch.source}: [{part}.{name}] differs from the vocabulary's schema ({vocab_file})"
                    + (f" at {key!r}: {a.get(name, {}).get(key)!r} here, {b.get(name, {}).get(key)!r} there"
                       if a.get(name) and b.get(name) else (" (absent there)" if a.get(name) else " (absent here)"))
                )
    if mine["domain"]["column"] != theirs.get("domain", {}).get("column") or \
            mine["domain"]["feature"] != theirs.get("domain", {}).get("feature"):
        raise ValueError(f"{sch.source}: [domain] column or feature differs from the vocabulary's schema ({vocab_file})")


def _pretrained_path(sch: TableSchema, spec: CategoricalColumn) -> Path:
    assert spec.pretrained is not None
    p = Path(spec.pretrained)
    return p if p.is_absolute() else sch.base_dir / p


def _build(sch: TableSchema, files: list[Path], kind: str, saved: dict[str, Any] | None, scoring: bool,
           progress: bool | None, root: Path | None = None) -> MultiDomainDataset:
    label_col = None if scoring else sch.label
    columns = sch.columns()
    optional = {c for c in (sch.label, sch.split.column) if c is not None and scoring}
    if sch.label is not None and scoring:
        optional.add(sch.label)
    rows = _Rows()
    domain_codes = _Codes()
    codes = {c.name: _Codes() for c in sch.categorical}
    numeric: dict[str, list[np.ndarray]] = {n.name: [] for n in sch.numeric}
    labels: list[np.ndarray] = []
    split_vals: list[np.ndarray] = []
    keys: list[pa.Array] = []
    split_codes = _Codes()
    split_parts: list[np.ndarray] = []
    bar = progress_bar(enabled=progress is not False, force=progress is True, desc="reading", unit=" rows",
                       unit_scale=True)
    try:
        coded = {sch.domain.column, *(c.column for c in sch.categorical if not c.multi)}
        if sch.split.kind is SplitKind.COLUMN and sch.split.column is not None:
            coded.add(sch.split.column)
        for chunk in _chunks(files, kind, columns, optional, coded, root):
            n = len(next(iter(chunk.columns.values()))) if chunk.columns else 0
            dom = domain_codes.add_single(chunk.columns[sch.domain.column],
                                          _Place(chunk.path, chunk.first_row, sch.domain.column))
            if (dom < 0).any():
                i = int(np.flatnonzero(dom < 0)[0])
                raise TableError(chunk.path, chunk.first_row + i, sch.domain.column, "empty domain value")
            if label_col is not None:
                labels.append(_label(chunk, label_col, sch.label_threshold))
            if sch.key is not None:
                keys.append(_as_text(chunk.columns[sch.key], _Place(chunk.path, chunk.first_row, sch.key)))
            for spec in sch.categorical:
                arr = chunk.columns[spec.column]
                if spec.multi:
                    codes[spec.name].add_multi(arr, spec, chunk)
                else:
                    codes[spec.name].add_single(arr, _Place(chunk.path, chunk.first_row, spec.column))
            for nspec in sch.numeric:
                numeric[nspec.name].append(finite_floats(chunk, nspec.column))
            if not scoring and sch.split.kind is SplitKind.COLUMN:
                assert sch.split.column is not None
                split_codes.add_single(chunk.columns[sch.split.column],
                                       _Place(chunk.path, chunk.first_row, sch.split.column))
            elif not scoring and sch.split.kind in (SplitKind.PARTITION, SplitKind.HASH):
                split_parts.append(chunk_split(sch, chunk))
            elif not scoring and sch.split.kind is SplitKind.TIME:
                assert sch.split.column is not None
                t = _as_float(chunk, sch.split.column)
                if np.isnan(t).any():
                    i = int(np.flatnonzero(np.isnan(t))[0])
                    raise TableError(chunk.path, chunk.first_row + i, sch.split.column, "empty time value")
                split_vals.append(t)
            rows.add(chunk, n)
            bar.update(n)
    finally:
        bar.close()
    n = rows.total
    if n == 0:
        raise TableError(files[0], None, None, "no data rows")

    # Domains.
    dom_values, dom_codes = domain_codes.merge()
    domain, domain_names, domain_map, keep_rows = _domains(sch, dom_values.to_pylist(), dom_codes, rows, saved)
    label = np.concatenate(labels).astype(np.float32) if labels else np.zeros(n, dtype=np.float32)

    # Splits.
    if scoring:
        part = np.full(n, 2, dtype=np.int8)
    elif sch.split.kind is SplitKind.RANDOM:
        part = np.full(n, -1, dtype=np.int8)
        part[keep_rows] = assign_splits(domain[keep_rows], label[keep_rows], fractions=sch.split.fractions,
                                        seed=sch.split.seed)
    elif sch.split.kind is SplitKind.COLUMN:
        values, scodes = split_codes.merge()
        names = values.to_pylist()
        lut = np.array([sch.split.values.index(v) if v in sch.split.values else -1 for v in names] + [-1],
                       dtype=np.int8)
        part = lut[scodes]  # -1 (null) takes the appended -1
        bad = np.flatnonzero((part < 0) & keep_rows)
        if bad.size:
            path, row = rows.locate(int(bad[0]))
            value = names[scodes[bad[0]]] if scodes[bad[0]] >= 0 else None
            raise TableError(path, row, sch.split.column, f"split value {value!r} is none of {list(sch.split.values)}")
    elif sch.split.kind in (SplitKind.PARTITION, SplitKind.HASH):
        part = np.concatenate(split_parts)
    else:
        assert sch.split.cuts is not None
        t = np.concatenate(split_vals)
        part = np.where(t < sch.split.cuts[0], 0, np.where(t < sch.split.cuts[1], 1, 2)).astype(np.int8)
    part[~keep_rows] = -1
    train_rows = part == 0
    if not scoring:
        counts = np.bincount(domain[train_rows], minlength=len(domain_names))
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise TableError(files[0] if len(files) == 1 else Path(files[0]).parent, None, sch.domain.column,
                             f"domain {domain_names[int(empty[0])]!r} has no training rows (empty domain)")
        for p, what in ((1, "validation"), (2, "test")):
            if not (part == p).any():
                # Early stopping needs validation rows, the metrics test rows: an empty split
                # would train unchecked and report null for every metric.
                raise TableError(files[0] if len(files) == 1 else Path(files[0]).parent, None, sch.split.column,
                                 f"the {what} split is empty (split {sch.split.kind.value!r}: "
                                 + {SplitKind.RANDOM: f"{n} rows, fractions {list(sch.split.fractions)}",
                                    SplitKind.COLUMN: f"no row has the value {sch.split.values[p]!r}",
                                    SplitKind.TIME: f"cuts {list(sch.split.cuts or ())}",
                                    SplitKind.PARTITION: f"last {list(sch.split.last or ())}",
                                    SplitKind.HASH: f"{n} rows, fractions {list(sch.split.fractions)}",
                                    }[sch.split.kind]
                                 + "); every split needs rows")

    # Categorical fields.
    # Every column is gathered once into split order (train, val, test rows, each in input
    # order) as soon as it is final, and the three splits are views of it: the final dataset is
    # never held twice.
    parts = [np.flatnonzero(part == p) for p in range(3)]
    order = np.concatenate(parts)
    bounds = np.cumsum([0, *(x.size for x in parts)])
    columns_out: dict[str, np.ndarray] = {}

    def keep(name: str, values: np.ndarray) -> None:
        columns_out[name] = np.ascontiguousarray(values[order])

    specs: list[FeatureSpec] = []
    artifacts_cat: dict[str, Any] = {}
    pretrained: dict[str, torch.Tensor] = {}
    for spec in sch.categorical:
        field_codes = codes.pop(spec.name)
        uniques, c = field_codes.merge()
        if spec.multi:
            width = max(field_codes.width, 1)
            c = c.reshape(n, spec.max_len)[:, :width]
        prior = None if saved is None else saved["categorical"].get(spec.name)
        if saved is not None and prior is None:
            raise ValueError(f"{sch.source}: field {spec.name!r} is not in the vocabulary file")
        c = c[order]  # split order: the training rows first
        ids, art = _vocabulary(spec, uniques, c, int(bounds[1]), prior)
        del field_codes, c
        need = table_bytes(int(art["vocab_size"]), spec.dim)
        if need > MAX_TABLE_BYTES:  # before the model allocates it
            raise TableError(files[0] if len(files) == 1 else Path(files[0]).parent, None, spec.column,
                             f"{art['vocab_size']} ids x dim {spec.dim} would need {human_bytes(need)} for the float32 "
                             f"table of field {spec.name!r}, over the limit of {human_bytes(MAX_TABLE_BYTES)}: raise "
                             "min_count, use hash_buckets, or lower dim")
        art["width"] = int(ids.shape[1]) if spec.multi else 1
        columns_out[spec.name] = ids
        del ids
        artifacts_cat[spec.name] = art
        pooling = spec.pooling if spec.multi else Pooling.NONE
        specs.append(FeatureSpec(spec.name, art["vocab_size"], spec.dim, pooling))
        if spec.pretrained is not None:
            pretrained[spec.name] = _read_pretrained(_pretrained_path(sch, spec), spec, art)
    if sch.domain.feature:
        keep(DOMAIN_FIELD, domain)
        specs.append(FeatureSpec(DOMAIN_FIELD, len(domain_names), sch.dim))

    # Numeric fields.
    numeric_specs: list[NumericSpec] = []
    artifacts_num: dict[str, Any] = {}
    for nspec in sch.numeric:
        raw = np.concatenate(numeric.pop(nspec.name))
        prior = None if saved is None else saved["numeric"].get(nspec.name)
        if saved is not None and prior is None:
            raise ValueError(f"{sch.source}: numeric field {nspec.name!r} is not in the vocabulary file")
        values, art = _numeric(nspec, raw, train_rows, rows, prior)
        keep(nspec.name, values)
        numeric_specs.append(NumericSpec(nspec.name))
        artifacts_num[nspec.name] = art
        if nspec.indicator:
            keep(f"{nspec.name}_missing", np.isnan(raw).astype(np.float32))
            numeric_specs.append(NumericSpec(f"{nspec.name}_missing"))

    splits = []
    domain_sorted = domain[order].astype(np.int64)
    label_sorted = label[order]
    for p in range(3):
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        splits.append(Split(
            {k: torch.from_numpy(v[lo:hi]) for k, v in columns_out.items()},
            torch.from_numpy(domain_sorted[lo:hi]),
            torch.from_numpy(label_sorted[lo:hi]),
        ))
    artifacts = vocab_artifacts(sch, domain_names, domain_map, artifacts_cat, artifacts_num)
    info: dict[str, Any] = {
        "source": "table",
        "files": [str(f) for f in files],
        "rows": n,
        "dropped_rows": int((~keep_rows).sum()),
        "table": artifacts,
    }
    if sch.key is not None:
        key_all = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
        info["keys"] = key_all.filter(pa.array(part == 2)).to_pylist()
    name = "table-" + (root.name if root is not None else files[0].name.split(".")[0])
    return MultiDomainDataset(
        name=name,
        features=tuple(specs),
        domain_names=tuple(domain_names),
        train=splits[0],
        val=splits[1],
        test=splits[2],
        info=info,
        pretrained=pretrained,
        numeric=tuple(numeric_specs),
    )


def vocab_artifacts(sch: TableSchema, domain_names: list[str], domain_map: Mapping[str, int],
                    categorical: Mapping[str, Any], numeric: Mapping[str, Any]) -> dict[str, Any]:
    """The content of ``vocab.json`` (``info["table"]``): the schema, the reserved ids, the
    domain map, every field's vocabulary and every numeric field's statistics."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "schema": sch.to_dict(),
        "hash": HASH_NAME,
        "reserved": {"padding": PADDING_ID, "oov": OOV_ID, "missing": MISSING_ID, "first_value": RESERVED},
        "domains": {"column": sch.domain.column, "names": list(domain_names), "values": dict(domain_map),
                    "other": (domain_names.index(sch.domain.other)
                              if sch.domain.policy is DomainPolicy.OTHER and sch.domain.other in domain_names
                              else None),
                    "feature": DOMAIN_FIELD if sch.domain.feature else None},
        "categorical": dict(categorical),
        "numeric": dict(numeric),
        "label": None if sch.label is None else {"column": sch.label, "threshold": sch.label_threshold},
        "key": sch.key,
    }


_LABEL_TEXT = pa.array(["0", "1"], pa.string())


def chunk_split(sch: TableSchema, chunk: _Chunk) -> np.ndarray:
    """int8 ``[n]``: each row's split (0 train, 1 val, 2 test) under a split kind that needs no
    full read (``column``, ``time``, ``partition``, ``hash``); a row no split can take is a
    :class:`TableError` at its row. Shared by the in-memory load and the streamed source."""
    kind = sch.split.kind
    if kind is SplitKind.RANDOM:
        raise ValueError(f"{sch.source}: split.kind = 'random' needs the whole data (it is stratified per domain "
                         "and label); a streamed source takes split.kind = 'hash' (a stable hash of the key), "
                         "'column', 'time' or 'partition'")
    if kind is SplitKind.HASH:
        assert sch.key is not None
        place = _Place(chunk.path, chunk.first_row, sch.key)
        keys = _as_text(chunk.columns[sch.key], place)
        nulls = np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False))
        if nulls.size:
            raise place.error(int(nulls[0]), "empty key (split.kind = 'hash' hashes the key of every row)")
        bucket = hash_ids(keys.to_pylist(), HASH_SPLIT_BUCKETS, sch.split.seed) - RESERVED
        f = sch.split.fractions
        cut_train = int(np.floor(HASH_SPLIT_BUCKETS * f[0] + 0.5))
        cut_val = int(np.floor(HASH_SPLIT_BUCKETS * (f[0] + f[1]) + 0.5))
        return np.where(bucket < cut_train, 0, np.where(bucket < cut_val, 1, 2)).astype(np.int8)
    column = sch.split.column
    assert column is not None
    if kind is SplitKind.TIME:
        assert sch.split.cuts is not None
        t = _as_float(chunk, column)
        if np.isnan(t).any():
            i = int(np.flatnonzero(np.isnan(t))[0])
            raise TableError(chunk.path, chunk.first_row + i, column, "empty time value")
        return np.where(t < sch.split.cuts[0], 0, np.where(t < sch.split.cuts[1], 1, 2)).astype(np.int8)
    arr = chunk.columns[column]
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    text = _trimmed(_as_text(arr, _Place(chunk.path, chunk.first_row, column)))
    nulls = np.flatnonzero(pc.or_kleene(text.is_null(), pc.equal(text, "")).fill_null(True)
                           .to_numpy(zero_copy_only=False))
    if kind is SplitKind.PARTITION:
        assert sch.split.last is not None
        if nulls.size:
            i = int(nulls[0])
            raise TableError(chunk.path, chunk.first_row + i, column, "empty partition value (split.kind = "
                             "'partition' needs a value on every row)")
        le_train = pc.less_equal(text, sch.split.last[0]).to_numpy(zero_copy_only=False)
        le_val = pc.less_equal(text, sch.split.last[1]).to_numpy(zero_copy_only=False)
        return np.where(le_train, 0, np.where(le_val, 1, 2)).astype(np.int8)
    pos = pc.index_in(text, value_set=pa.array(list(sch.split.values), pa.string())).fill_null(-1)
    part = pos.to_numpy(zero_copy_only=False).astype(np.int8)
    bad = np.flatnonzero(part < 0)
    if bad.size:
        i = int(bad[0])
        raise TableError(chunk.path, chunk.first_row + i, column,
                         f"split value {text[i].as_py()!r} is none of {list(sch.split.values)}")
    return part


def _label(chunk: _Chunk, column: str, threshold: float | None) -> np.ndarray:
    """float32 labels of one chunk (docs/data.md, "Labels").

    Without ``label_threshold`` a label is the text ``0`` or ``1`` exactly (CSV; a Parquet text
    column) or the number 0 or 1 (a Parquet number or boolean column): ``" 1 "``, ``+1``,
    ``1.0`` and ``1e0`` are refused, like the integer grammar of the other loaders. With it, a
    label is any finite number (as a numeric field reads it), 1 iff >= the threshold.
    """
    arr = chunk.columns[column]
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    if nulls.any():
        i = int(np.flatnonzero(nulls)[0])
        raise TableError(chunk.path, chunk.first_row + i, column, "empty label")
    is_text = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
    if threshold is None and is_text:
        ok = pc.is_in(arr, value_set=_LABEL_TEXT).to_numpy(zero_copy_only=False)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise TableError(chunk.path, chunk.first_row + i, column, _label_problem(arr[i].as_py()))
        out: np.ndarray = pc.equal(arr, "1").to_numpy(zero_copy_only=False).astype(np.float32)
        return out
    values = _as_float(chunk, column)
    bad_number = ~np.isfinite(values)
    if bad_number.any():
        i = int(np.flatnonzero(bad_number)[0])
        raise TableError(chunk.path, chunk.first_row + i, column, f"label {values[i]} is not a finite number")
    if threshold is not None:
        out = (values >= threshold).astype(np.float32)
        return out
    bad = (values != 0) & (values != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TableError(chunk.path, chunk.first_row + i, column,
                         f"label {values[i]:g} outside {{0, 1}} (set label_threshold to map other values)")
    return values.astype(np.float32)


def _label_problem(text: str) -> str:
    """Why the label text ``text`` (not ``0`` or ``1``) is refused."""
    try:
        number = float(text)
    except ValueError:
        return f"label {text!r} is not 0 or 1 (set label_threshold to map other values)"
    if number != number:
        return f"label {text!r} is NaN, not 0 or 1"
    if number in (0.0, 1.0):
        return (f"label {text!r} is not written 0 or 1: a label is the text 0 or 1 exactly (set label_threshold "
                "= 0.5 to read labels as numbers)")
    return f"label {number:g} outside {{0, 1}} (set label_threshold to map other values)"


def _domains(sch: TableSchema, values: list[str], codes: np.ndarray, rows: _Rows,
             saved: dict[str, Any] | None) -> tuple[np.ndarray, list[str], dict[str, int], np.ndarray]:
    # Under policy "other", a value unseen at vocabulary time also folds into "other" later.
    """``(domain id per row, names, raw value -> id, rows kept)`` under the schema's policies."""
    d = sch.domain
    keep_rows = np.ones(codes.size, dtype=bool)
    if saved is not None:
        domain_map: dict[str, int] = dict(saved["domains"]["values"])
        names = list(saved["domains"]["names"])
        other = saved["domains"].get("other")
        lut = np.array([domain_map.get(v, -1 if other is None else other) for v in values], dtype=np.int64)
        ids = lut[codes]
        unknown = np.flatnonzero(ids < 0)
        if unknown.size:
            if d.policy is DomainPolicy.DROP:
                keep_rows[unknown] = False
                ids[unknown] = 0
            else:
                path, row = rows.locate(int(unknown[0]))
                raise TableError(path, row, d.column, f"domain {values[codes[unknown[0]]]!r} is not in the "
                                 f"vocabulary's domains {names}")
        return ids, names, domain_map, keep_rows
    counts = np.bincount(codes, minlength=len(values))

    def first_row(k: int) -> tuple[Path, int]:
        return rows.locate(int(np.flatnonzero(codes == k)[0]))

    names, domain_map = domain_map_of(sch, values, counts, first_row, rows.where[0][0])
    lut = np.array([domain_map.get(v, -1) for v in values], dtype=np.int64)
    ids = lut[codes]
    keep_rows &= ids >= 0
    ids[~keep_rows] = 0
    return ids, names, domain_map, keep_rows


def domain_map_of(sch: TableSchema, values: list[str], counts: np.ndarray,
                  first_row: Any, where: Path) -> tuple[list[str], dict[str, int]]:
    """``(domain names in id order, raw value -> id)`` from every distinct domain value and its
    row count, under the schema's order, ``min_rows``, ``max_domains`` and policy: the one rule of
    the in-memory load and of the streamed first pass. ``first_row(k)`` locates value ``k``'s
    first row for a message; ``where`` names the data when no row does."""
    d = sch.domain
    index = {v: i for i, v in enumerate(values)}
    if d.order is not None:
        order = list(d.order)
        absent = [v for v in order if v not in index or counts[index[v]] == 0]
        if absent:
            raise TableError(where, None, d.column, f"domain {absent[0]!r} named in domain.order has no "
                             "rows (empty domain)")
        listed = set(order)
        unlisted = [v for v in values if v not in listed]
        if unlisted and d.policy is DomainPolicy.ERROR:
            path, row = first_row(index[unlisted[0]])
            raise TableError(path, row, d.column, f"domain {unlisted[0]!r} is not in domain.order {order}")
    else:
        # Sorted by the value's text (code points): the same order whatever the row order.
        order = sorted(values)
        unlisted = []
    # Too few rows, then too many domains (the largest kept; ties by order).
    small = [v for v in order if counts[index[v]] < d.min_rows]
    if small and d.policy is DomainPolicy.ERROR:
        raise TableError(where, None, d.column,
                         f"domain {small[0]!r} has {int(counts[index[small[0]]])} rows, fewer than "
                         f"domain.min_rows = {d.min_rows} (policy 'error'; 'drop' or 'other' to go on)")
    small_set = set(small)
    kept = [v for v in order if v not in small_set]
    # Under "other", the folded domain counts towards max_domains.
    needs_other = d.policy is DomainPolicy.OTHER and bool(small or unlisted or len(kept) > d.max_domains)
    limit = d.max_domains - (1 if needs_other else 0)
    if len(kept) > limit:
        if d.policy is DomainPolicy.ERROR:
            raise TableError(where, None, d.column,
                             f"{len(kept)} domains, more than domain.max_domains = {d.max_domains} "
                             "(policy 'error'; 'drop' or 'other' to go on)")
        position = {v: i for i, v in enumerate(order)}
        by_size = sorted(kept, key=lambda v: (-int(counts[index[v]]), position[v]))
        chosen = set(by_size[:max(limit, 0)])
        kept = [v for v in kept if v in chosen]
    domain_map = {v: i for i, v in enumerate(kept)}
    names = list(kept)
    folded = [v for v in values if v not in domain_map]
    if folded and d.policy is DomainPolicy.OTHER:
        if d.other in domain_map:
            raise ValueError(f"{sch.source}: domain.other = {d.other!r} is also a real domain value")
        other = len(names)
        names.append(d.other)
        for v in folded:
            domain_map[v] = other
    if not names:
        raise TableError(where, None, d.column, "no domain left after the domain policies")
    return names, domain_map


def ordered_vocabulary(spec: CategoricalColumn, values: pa.Array, counts: np.ndarray) -> pa.Table:
    """The vocabulary of a field from each distinct training value and its count: ``(count,
    value)`` rows, the values seen at least ``min_count`` times, most frequent first, ties in
    code-point order of the value, the first ``max_size`` of them when that is set. Row ``k`` is
    id ``3 + k``. The one rule of the in-memory load and of the streamed first pass."""
    kept = np.flatnonzero(counts >= spec.min_count)
    table = pa.table({"count": pa.array(counts[kept], pa.int64()),
                      "value": values.cast(pa.string()).take(pa.array(kept, pa.int64()))})
    ordered = table.sort_by([("count", "descending"), ("value", "ascending")])
    if spec.max_size and ordered.num_rows > spec.max_size:
        ordered = ordered.slice(0, spec.max_size)
    return ordered


def _vocabulary(spec: CategoricalColumn, uniques: pa.Array, codes: np.ndarray, num_train: int,
                prior: Mapping[str, Any] | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Final ids (int64, same shape as ``codes``, whose first ``num_train`` rows are the training
    split's) and the field's vocabulary record."""
    missing_id = MISSING_ID if spec.missing is MissingPolicy.OWN else OOV_ID
    art: dict[str, Any] = {"column": spec.column, "multi": spec.multi, "delimiter": spec.delimiter,
                           "max_len": spec.max_len, "missing_id": missing_id}
    buckets = spec.hash_buckets if prior is None else int((prior.get("hash") or {}).get("buckets", 0))
    seed = spec.hash_seed if prior is None else int((prior.get("hash") or {}).get("seed", 0))
    if buckets:
        lut = hash_ids(uniques.to_pylist(), buckets, seed)
        art.update(hash={"buckets": buckets, "seed": seed}, vocab_size=RESERVED + buckets, values=None)
    elif prior is not None:
        known = pa.array(prior["values"], pa.string())
        pos = pc.index_in(uniques, value_set=known).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        lut = np.where(pos >= 0, pos + RESERVED, OOV_ID)
        art.update(hash=None, vocab_size=int(prior["vocab_size"]), values=list(prior["values"]),
                   counts=prior.get("counts"))
        missing_id = int(prior["missing_id"])
        art["missing_id"] = missing_id
    else:
        # Codes -2 (padding) and -1 (missing) land in the first two bins, which are dropped.
        counts = np.bincount(codes[:num_train].reshape(-1) + 2, minlength=len(uniques) + 2)[2:]
        ordered = ordered_vocabulary(spec, uniques, counts)
        rank = pc.index_in(uniques.cast(pa.string()), value_set=ordered["value"]).fill_null(-1)
        rank_np = rank.to_numpy(zero_copy_only=False).astype(np.int64)
        lut = np.where(rank_np >= 0, rank_np + RESERVED, OOV_ID)
        art.update(hash=None, vocab_size=RESERVED + ordered.num_rows, values=ordered["value"].to_pylist(),
                   counts=ordered["count"].to_pylist())
    lut_full = np.concatenate([lut.astype(np.int64), np.array([PADDING_ID, missing_id], dtype=np.int64)])
    # codes: -1 missing -> lut_full[-1] = missing_id, -2 padding -> lut_full[-2] = padding.
    ids = lut_full[codes]
    if spec.multi and ids.size:
        # An empty or missing bag stays all padding (a zero vector); a missing item is skipped.
        ids = np.ascontiguousarray(ids)
    return ids, art


@dataclass(frozen=True)
class SavedField:
    """One field's saved vocabulary (its ``vocab.json`` record) as a lookup built once per
    source and reused for every chunk: raw value -> id (``3 + rank``, :data:`OOV_ID` when
    unknown), or the hash buckets of a hashed field. The streamed source encodes each row group
    with it: a value set rebuilt (and hashed) per row group cost memory and, with a large
    vocabulary, time in proportion to the vocabulary, not to the row group."""

    missing_id: int
    buckets: int
    seed: int
    index: Mapping[str, int]

    @classmethod
    def of(cls, prior: Mapping[str, Any]) -> SavedField:
        hashed = prior.get("hash") or {}
        values = [] if hashed else prior["values"]
        # The values are distinct (a vocabulary); the dict shares their str objects with ``prior``.
        return cls(int(prior["missing_id"]), int(hashed.get("buckets", 0)), int(hashed.get("seed", 0)),
                   dict(zip(values, range(RESERVED, RESERVED + len(values)), strict=True)))

    def ids(self, uniques: pa.Array, codes: np.ndarray) -> np.ndarray:
        """int64 ids of ``codes`` (indices into ``uniques``; -1 missing, -2 padding), the ids
        :func:`_vocabulary` gives under the same record."""
        values = uniques.to_pylist()
        if self.buckets:
            lut = hash_ids(values, self.buckets, self.seed).astype(np.int64)
        else:
            get = self.index.get
            lut = np.fromiter((get(v, OOV_ID) for v in values), dtype=np.int64, count=len(values))
        lut_full = np.concatenate([lut, np.array([PADDING_ID, self.missing_id], dtype=np.int64)])
        return lut_full[codes]


def _numeric(nspec: Any, raw: np.ndarray, train_rows: np.ndarray, rows: _Rows,
             prior: Mapping[str, Any] | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Transformed, filled float32 values and the field's statistics record."""
    transform = nspec.transform if prior is None else Transform(prior["transform"])
    x = raw.copy()
    if transform in (Transform.LOG1P, Transform.LOG1P_STANDARDISE):
        bad = np.flatnonzero(x <= -1)
        if bad.size:
            path, row = rows.locate(int(bad[0]))
            raise TableError(path, row, nspec.column, f"log1p needs values > -1, got {x[bad[0]]:g}")
        x = np.log1p(x)
    mean, std = 0.0, 1.0
    where = rows.where[0][0] if rows.where else Path("<data>")
    if transform in (Transform.STANDARDISE, Transform.LOG1P_STANDARDISE):
        if prior is not None:
            mean, std = float(prior["mean"]), float(prior["std"])
            if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
                raise TableError(where, None, nspec.column, f"the vocabulary's statistics of numeric field "
                                 f"{nspec.name!r} are not finite (mean {mean}, std {std}): rebuild them")
        else:
            mean, std = _mean_std(x[train_rows & ~np.isnan(x)])
            if not (np.isfinite(mean) and np.isfinite(std)):
                raise TableError(where, None, nspec.column, f"the training rows' mean ({mean}) or std ({std}) is "
                                 "not a finite number")
        with np.errstate(over="ignore", invalid="ignore"):
            x = (x - mean) / std
    fill = nspec.fill if prior is None else float(prior["fill"])
    x = np.where(np.isnan(x), fill, x)
    # float32 is what the model reads: a value beyond it (1e300, or after the transform) is located.
    bad = np.flatnonzero(~(np.abs(x) <= np.finfo(np.float32).max))
    if bad.size:
        i = int(bad[0])
        path, row = rows.locate(i)
        raise TableError(path, row, nspec.column, f"value {float(raw[i])!r} overflows float32 after the transform "
                         f"({transform.value}{f', mean {mean:g}, std {std:g}' if std != 1.0 or mean else ''})")
    art = {"column": nspec.column, "transform": transform.value, "mean": mean, "std": std, "fill": fill,
           "indicator": nspec.indicator if prior is None else bool(prior["indicator"])}
    return x.astype(np.float32), art


def _mean_std(seen: np.ndarray) -> tuple[float, float]:
    """The mean and population std (ddof 0) of finite float64 values; a constant column's std is
    1, not 0. Computed as numpy does; where that overflows (values near 1e154 and up square
    beyond float64), again on values scaled by their largest magnitude, which cannot overflow."""
    if not seen.size:
        return 0.0, 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = float(seen.mean()), float(seen.std())
        if not (np.isfinite(mean) and np.isfinite(std)):
            scale = float(np.abs(seen).max())
            y = seen / scale
            mean, std = float(y.mean()) * scale, float(y.std()) * scale
    return mean, std or 1.0


def _read_pretrained(path: Path, spec: CategoricalColumn, art: Mapping[str, Any]) -> torch.Tensor:
    """float32 ``[vocab_size, dim]``: row ``3 + k`` the vector of the ``k``-th vocabulary value;
    reserved ids and values without a vector stay zero."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ValueError(f"pretrained vectors for {spec.name!r}: {str(path)!r} does not exist")
    try:
        if path.name.lower().endswith(_PARQUET_EXT):
            tab = pq.read_table(path)
        else:
            tab = pacsv.read_csv(str(path), read_options=pacsv.ReadOptions(autogenerate_column_names=True),
                                 parse_options=_csv_parse_options(path),
                                 convert_options=pacsv.ConvertOptions(column_types={"f0": pa.string()}))
    except (OSError, pa.ArrowException) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(path, None, None, f"pretrained vectors cannot be read ({detail})") from None
    if tab.num_columns < 2:
        raise TableError(path, None, None, "pretrained vectors need a value column and then the vector")
    keys = _trimmed(_as_text(tab.column(0).combine_chunks(), _Place(path, 1, tab.column_names[0])))
    if tab.num_columns == 2 and pa.types.is_list(tab.column(1).type):
        vec = np.array(tab.column(1).to_pylist(), dtype=np.float64)
    else:
        cols = []
        for j in range(1, tab.num_columns):
            chunk = _Chunk(path, 1, {"c": tab.column(j).combine_chunks()})
            try:
                cols.append(_as_float(chunk, "c"))
            except TableError as exc:
                raise TableError(path, exc.row, tab.column_names[j], str(exc).split(": ", 1)[-1]) from None
        vec = np.stack(cols, axis=1)
    if vec.ndim != 2 or vec.shape[1] != spec.dim:
        raise TableError(path, None, None, f"vectors of width {vec.shape[-1] if vec.ndim == 2 else '?'}, "
                         f"field {spec.name!r} has dim {spec.dim}")
    bad = np.flatnonzero(~np.isfinite(vec).all(axis=1))
    if bad.size:
        raise TableError(path, int(bad[0]) + 1, None, "a non-finite or missing vector value")
    table = np.zeros((art["vocab_size"], spec.dim), dtype=np.float32)
    pos = pc.index_in(pa.array(art["values"], pa.string()), value_set=keys).fill_null(-1)
    pos_np = pos.to_numpy(zero_copy_only=False)
    have = np.flatnonzero(pos_np >= 0)
    table[have + RESERVED] = vec[pos_np[have]]
    return torch.from_numpy(table)


def save_vocab(dataset: MultiDomainDataset, run_dir: str | os.PathLike[str]) -> Path:
    """Write a table dataset's vocabularies to ``run_dir/vocab.json``; ``ValueError`` for a
    dataset that is not from the tabular source."""
    artifacts = dataset.info.get("table")
    if not isinstance(artifacts, Mapping):
        raise ValueError(f"dataset {dataset.name!r} carries no vocabularies (not loaded from a table)")
    return write_vocab(run_dir, artifacts)
