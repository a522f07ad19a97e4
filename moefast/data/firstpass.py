"""The first pass of a streamed click log: vocabularies, statistics and domains in bounded memory.

:func:`first_pass` reads a Parquet log (a file or a Hive-partitioned folder) a record batch at
a time and returns what the in-memory table source builds from its training split, in the same
form (``vocab.json``, :func:`moefast.data.vocab.read_vocab`):

- exact per-column counts over the **training split only**, merged batch by batch and file by
  file; ids then follow :func:`moefast.data.table.ordered_vocabulary` (count descending, then
  value; ``min_count``; the first ``max_size``), so they equal the in-memory source's ids on the
  same split; hashed fields (``hash_buckets``) count nothing;
- the numeric transforms' statistics (mean and population std of the transformed training
  values, merged per batch with Chan's formula: equal to the in-memory figures up to float64
  rounding, about 1e-15 relative);
- the domain list under ``order``, ``max_domains``, ``min_rows`` and the policy
  (:func:`moefast.data.table.domain_map_of`, the in-memory rule, on the row counts of **every**
  split, as the in-memory load counts them);
- for each pretrained field, its file and how many vocabulary values it holds a vector for;
- ``stream``: the split, the rows per split, and the fingerprint of the file list (each file's
  path under the folder, size, modification time and Parquet footer row count), which a
  streamed run checks before it reads (:func:`check_fingerprint`).

Two reads: the domain column (and the split's column) of every row, then every column of the
training rows (with a ``partition`` split on a partition key, only the training partitions'
files are opened). Memory grows with the number of distinct values of the fields, never with
rows: one record batch (``batch_rows``) plus, per field, its distinct training values and their
counts (compacted whenever the pending per-batch counts pass ``COMPACT_ROWS`` entries).

The split must need no full read: ``column``, ``time``, ``partition`` or ``hash``; ``random``
is refused naming ``hash``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moefast.data import table as _t
from moefast.data.schema import SplitKind, TableSchema, Transform, load_schema
from moefast.log import progress_bar

__all__ = ["COMPACT_ROWS", "check_fingerprint", "check_layout", "fingerprint", "first_pass", "footers", "stream_files"]

COMPACT_ROWS = 1 << 20


def stream_files(path: str | os.PathLike[str], sch: TableSchema, *, scoring: bool = False) -> tuple[list[Path], Path | None]:
    """``(files, root)`` of a streamed log: Parquet only (CSV stays in memory), a split that needs
    no full read (``scoring``: data to score, every row in the test split, no split needed)."""
    files, kind = _t.input_files(path)
    if kind != "parquet":
        raise ValueError(f"table data {str(path)!r} is CSV: a streamed source reads Parquet (CSV loads in memory; "
                         "drop --stream, or convert the log to Parquet)")
    if scoring:
        return files, Path(path) if Path(path).is_dir() else None
    if sch.split.kind is SplitKind.RANDOM:
        raise ValueError(f"{sch.source}: split.kind = 'random' needs the whole data in memory; a streamed source "
                         "takes split.kind = 'hash' (a stable hash of the key), 'column', 'time' or 'partition'")
    if sch.label is None:
        raise ValueError(f"{sch.source}: the first pass needs a label (training data)")
    root = Path(path) if Path(path).is_dir() else None
    return files, root


def _relative(f: Path, root: Path | None) -> str:
    return f.relative_to(root).as_posix() if root is not None else f.name


def footers(files: list[Path], root: Path | None) -> list[Any]:
    """Each file's Parquet footer, read through one ``pyarrow.dataset`` of the files
    (:func:`moefast.data.table.footer`: a file that is not Parquet is a located error)."""
    dataset = _t.parquet_dataset(files, root)
    return [_t.footer(frag, f) for frag, f in zip(dataset.get_fragments(), files, strict=True)]


def fingerprint(files: list[Path], root: Path | None, metas: list[Any] | None = None) -> list[dict[str, Any]]:
    """Each file's path (under the folder), size, modification time (ns) and footer row count
    (``metas``: the files' footers, when already read)."""
    metas = footers(files, root) if metas is None else metas
    out = []
    for f, meta in zip(files, metas, strict=True):
        st = f.stat()
        out.append({"path": _relative(f, root), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "rows": meta.num_rows})
    return out


def check_fingerprint(recorded: list[Mapping[str, Any]], files: list[Path], root: Path | None,
                      where: str, metas: list[Any] | None = None) -> None:
    """``TableError`` naming the first file added, deleted or changed (size, modification time or
    footer row count) since the first pass whose fingerprint is ``recorded`` (from ``where``;
    ``metas``: the files' footers, when already read)."""
    now = {_relative(f, root): f for f in files}
    then = {str(r["path"]): r for r in recorded}
    base = root if root is not None else (files[0].parent if files else Path("."))
    for rel in sorted(set(then) - set(now)):
        raise _t.TableError(base / rel, None, None, f"deleted since the first pass ({where}): run "
                            "`moefast vocab` again, or restore it")
    for rel in sorted(set(now) - set(then)):
        raise _t.TableError(now[rel], None, None, f"added since the first pass ({where}): its rows are in no "
                            "vocabulary; run `moefast vocab` again, or move it out")
    footer_of = dict(zip(files, metas, strict=True)) if metas is not None else {}
    for rel, f in sorted(now.items()):
        st = f.stat()  # the size and the time first: a truncated file is "changed", footer or not
        changes = [("bytes", "size", st.st_size), ("mtime_ns", "modification time", st.st_mtime_ns)]
        if all(then[rel][key] == mine for key, _, mine in changes):
            meta = footer_of[f] if f in footer_of else footers([f], root)[0]
            changes.append(("rows", "footer row count", meta.num_rows))
        for key, what, mine in changes:
            if mine != then[rel][key]:
                raise _t.TableError(f, None, None, f"changed since the first pass ({where}): {what} "
                                    f"{then[rel][key]} then, {mine} now (truncated or rewritten); run "
                                    "`moefast vocab` again")


def _family(t: pa.DataType) -> str:
    """What a column's Arrow type reads as: numbers, text, lists or booleans (int32 and int64, or
    string and a dictionary of strings, are the same thing to the source)."""
    if pa.types.is_dictionary(t):
        return _family(t.value_type)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list"
    if pa.types.is_boolean(t):
        return "boolean"
    return str(t)


def check_layout(files: list[Path], root: Path | None, columns: list[str], metas: list[Any] | None = None) -> None:
    """Refuse, from the footers alone (``metas``, when already read), a log whose files disagree
    on what a column the schema reads holds (a column of numbers in one partition and text in
    another), and an empty partition (a partition folder whose files hold no row): a
    :class:`TableError` naming the file (or folder) and the column."""
    first: dict[str, tuple[Path, pa.DataType]] = {}
    rows_in: dict[Path, int] = {}
    for f, meta in zip(files, footers(files, root) if metas is None else metas, strict=True):
        schema = meta.schema.to_arrow_schema()
        _t.check_header(f, schema.names, columns)  # a column named twice: which one is meant is a guess
        for c in columns:
            if c not in schema.names:
                continue  # a partition key, or missing: said where the file is read
            t = schema.field(c).type
            seen = first.setdefault(c, (f, t))
            if _family(t) != _family(seen[1]):
                raise _t.TableError(f, None, c, f"holds {_family(t)} ({t}), but {seen[0]} holds {_family(seen[1])} "
                                    f"({seen[1]}): the schema differs between files; rewrite this partition")
        rows_in[f.parent] = rows_in.get(f.parent, 0) + meta.num_rows
    if root is not None:
        for folder, rows in sorted(rows_in.items()):
            if not rows and folder != root:
                raise _t.TableError(folder, None, None, "an empty partition: its files hold no row (delete the folder, "
                                    "or write its rows)")
        for folder in sorted(p for p in root.rglob("*=*") if p.is_dir()):
            if not any(folder.iterdir()) and not folder.name.startswith((".", "_")):
                raise _t.TableError(folder, None, None, "an empty partition: the folder holds no file (delete it)")


@dataclass
class _Counts:
    """Distinct values and their counts, merged batch by batch (memory: distinct values)."""

    pending: list[tuple[pa.Array, np.ndarray]] = field(default_factory=list)
    size: int = 0

    def add(self, values: pa.Array, counts: np.ndarray) -> None:
        nz = np.flatnonzero(counts)
        if not nz.size:
            return
        self.pending.append((values.cast(pa.string()).take(pa.array(nz, pa.int64())), counts[nz].astype(np.int64)))
        self.size += int(nz.size)
        if self.size > COMPACT_ROWS and len(self.pending) > 1:
            self._compact()

    def _compact(self) -> None:
        table = pa.table({"value": pa.concat_arrays([v for v, _ in self.pending]),
                          "count": pa.array(np.concatenate([c for _, c in self.pending]), pa.int64())})
        merged = table.group_by("value").aggregate([("count", "sum")])
        values = merged["value"].combine_chunks()
        counts = merged["count_sum"].to_numpy().astype(np.int64)
        self.pending = [(values, counts)]
        self.size = len(values)

    def result(self) -> tuple[pa.Array, np.ndarray]:
        if not self.pending:
            return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
        if len(self.pending) > 1:
            self._compact()
        return self.pending[0]


@dataclass
class _Moments:
    """Count, mean and sum of squared deviations, merged per batch (Chan et al.)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        if not x.size:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            nb, mb = int(x.size), float(x.mean())
            m2b = float(((x - mb) ** 2).sum())
            n = self.n + nb
            delta = mb - self.mean
            self.mean += delta * nb / n
            self.m2 += m2b + delta * delta * self.n * nb / n
            self.n = n

    def mean_std(self) -> tuple[float, float]:
        if not self.n:
            return 0.0, 1.0
        std = math.sqrt(self.m2 / self.n) if math.isfinite(self.m2) else math.inf
        return self.mean, std or 1.0


def first_pass(path: str | os.PathLike[str], schema: str | os.PathLike[str] | TableSchema | Mapping[str, Any],
               *, batch_rows: int = _t.PARQUET_BATCH_ROWS, progress: bool | None = None) -> dict[str, Any]:
    """The vocabularies, statistics, domains and file fingerprint of the log ``path``'s training
    split, in bounded memory (the module docstring); the dict ``vocab.json`` holds."""
    sch = load_schema(schema)
    files, root = stream_files(path, sch)
    metas = footers(files, root)
    check_layout(files, root, sch.columns(), metas)
    prints = fingerprint(files, root, metas)
    split_cols = [sch.key] if sch.split.kind is SplitKind.HASH else [sch.split.column]
    head = list(dict.fromkeys([sch.domain.column, *[c for c in split_cols if c is not None]]))
    old_rows = _t.PARQUET_BATCH_ROWS
    _t.PARQUET_BATCH_ROWS = batch_rows
    bar = progress_bar(enabled=progress is not False, force=progress is True, desc="first pass", unit=" rows",
                       unit_scale=True)
    try:
        # 1. Domains: every row's domain and split.
        domain_all, domain_train = _Counts(), _Counts()
        first_seen: dict[str, tuple[Path, int]] = {}
        rows_per_split = np.zeros(3, dtype=np.int64)
        for chunk in _t._chunks(files, "parquet", head, set(), {sch.domain.column}, root):
            codes = _t._Codes()
            local = codes.add_single(chunk.columns[sch.domain.column],
                                     _t._Place(chunk.path, chunk.first_row, sch.domain.column))
            if (local < 0).any():
                i = int(np.flatnonzero(local < 0)[0])
                raise _t.TableError(chunk.path, chunk.first_row + i, sch.domain.column, "empty domain value")
            values = codes.dicts[0]
            part = _t.chunk_split(sch, chunk)
            domain_all.add(values, np.bincount(local, minlength=len(values)))
            domain_train.add(values, np.bincount(local[part == 0], minlength=len(values)))
            rows_per_split += np.bincount(part, minlength=3)[:3]
            present = np.bincount(local, minlength=len(values))
            for k, v in enumerate(values.to_pylist()):
                if present[k] and v not in first_seen:
                    first_seen[v] = (chunk.path, chunk.first_row + int(np.flatnonzero(local == k)[0]))
            bar.update(len(local))
        where = root if root is not None else files[0]
        if not rows_per_split.sum():
            raise _t.TableError(where, None, None, "no data rows")
        dvalues, dcounts = domain_all.result()
        names_list = dvalues.to_pylist()
        domain_names, domain_map = _t.domain_map_of(sch, names_list, dcounts,
                                                    lambda k: first_seen[names_list[k]], where)
        tvalues, tcounts = domain_train.result()
        per_domain = np.zeros(len(domain_names), dtype=np.int64)
        dropped_train = 0
        for v, c in zip(tvalues.to_pylist(), tcounts.tolist(), strict=True):
            if v in domain_map:
                per_domain[domain_map[v]] += c
            else:
                dropped_train += c
        empty = np.flatnonzero(per_domain == 0)
        if empty.size:
            raise _t.TableError(where, None, sch.domain.column,
                                f"domain {domain_names[int(empty[0])]!r} has no training rows (empty domain)")
        for p, what in ((1, "validation"), (2, "test")):
            if not rows_per_split[p]:
                raise _t.TableError(where, None, sch.split.column or sch.key,
                                    f"the {what} split is empty (split {sch.split.kind.value!r}); every split needs rows")

        # 2. The training rows: counts and moments.
        counted = [c for c in sch.categorical if not c.hash_buckets]
        counts = {c.name: _Counts() for c in counted}
        moments = {n.name: _Moments() for n in sch.numeric}
        train_files = _training_files(sch, files, root)
        dmap = pa.array(list(domain_map), pa.string())
        for chunk in _t._chunks(train_files, "parquet", sch.columns(), set(),
                                {sch.domain.column, *(c.column for c in counted if not c.multi)}, root):
            part = _t.chunk_split(sch, chunk)
            dom = chunk.columns[sch.domain.column]
            if pa.types.is_dictionary(dom.type):
                dom = dom.dictionary_decode()
            kept = pc.is_in(_t._trimmed(_t._as_text(dom)), value_set=dmap).to_numpy(zero_copy_only=False)
            train = (part == 0) & kept
            bar.update(int(train.sum()))
            if not train.any():
                continue
            for spec in counted:
                codes = _t._Codes()
                arr = chunk.columns[spec.column]
                if spec.multi:
                    codes.add_multi(arr, spec, chunk)
                    local = codes.local[0][train].reshape(-1)
                else:
                    local = codes.add_single(arr, _t._Place(chunk.path, chunk.first_row, spec.column))[train]
                values = codes.dicts[0]
                counts[spec.name].add(values, np.bincount(local[local >= 0], minlength=len(values)))
            for nspec in sch.numeric:
                x = _t.finite_floats(chunk, nspec.column)[train]
                if nspec.transform in (Transform.LOG1P, Transform.LOG1P_STANDARDISE):
                    low = np.flatnonzero(x <= -1)
                    if low.size:
                        rows = np.flatnonzero(train)
                        raise _t.TableError(chunk.path, chunk.first_row + int(rows[low[0]]), nspec.column,
                                            f"log1p needs values > -1, got {x[low[0]]:g}")
                    x = np.log1p(x)
                moments[nspec.name].add(x[~np.isnan(x)])
    finally:
        bar.close()
        _t.PARQUET_BATCH_ROWS = old_rows

    cat: dict[str, Any] = {}
    pretrained: dict[str, Any] = {}
    for spec in sch.categorical:
        missing_id = _t.MISSING_ID if spec.missing is _t.MissingPolicy.OWN else _t.OOV_ID
        art: dict[str, Any] = {"column": spec.column, "multi": spec.multi, "delimiter": spec.delimiter,
                               "max_len": spec.max_len, "missing_id": missing_id,
                               "width": spec.max_len if spec.multi else 1}
        if spec.hash_buckets:
            art.update(hash={"buckets": spec.hash_buckets, "seed": spec.hash_seed},
                       vocab_size=_t.RESERVED + spec.hash_buckets, values=None)
        else:
            values, c = counts[spec.name].result()
            ordered = _t.ordered_vocabulary(spec, values, c)
            art.update(hash=None, vocab_size=_t.RESERVED + ordered.num_rows, values=ordered["value"].to_pylist(),
                       counts=ordered["count"].to_pylist())
        need = _t.table_bytes(int(art["vocab_size"]), spec.dim)
        if need > _t.MAX_TABLE_BYTES:
            raise _t.TableError(where, None, spec.column,
                                f"{art['vocab_size']} ids x dim {spec.dim} would need {_t.human_bytes(need)} for the "
                                f"float32 table of field {spec.name!r}, over the limit of "
                                f"{_t.human_bytes(_t.MAX_TABLE_BYTES)}: raise min_count, set max_size, use "
                                "hash_buckets, or lower dim")
        cat[spec.name] = art
        if spec.pretrained is not None:
            table = _t._read_pretrained(_t._pretrained_path(sch, spec), spec, art)
            pretrained[spec.name] = {"file": str(_t._pretrained_path(sch, spec)),
                                     "values_with_vectors": int(table.abs().sum(dim=1).gt(0).sum())}
    num: dict[str, Any] = {}
    for nspec in sch.numeric:
        mean, std = 0.0, 1.0
        if nspec.transform in (Transform.STANDARDISE, Transform.LOG1P_STANDARDISE):
            mean, std = moments[nspec.name].mean_std()
            if not (math.isfinite(mean) and math.isfinite(std)):
                raise _t.TableError(where, None, nspec.column, f"the training rows' mean ({mean}) or std ({std}) is "
                                    "not a finite number")
        num[nspec.name] = {"column": nspec.column, "transform": nspec.transform.value, "mean": mean, "std": std,
                           "fill": nspec.fill, "indicator": nspec.indicator}
    artifacts = _t.vocab_artifacts(sch, domain_names, domain_map, cat, num)
    artifacts["pretrained"] = pretrained
    artifacts["stream"] = {
        "split": sch.split.kind.value,
        "rows": {"train": int(rows_per_split[0]), "val": int(rows_per_split[1]), "test": int(rows_per_split[2])},
        "dropped_train_rows": int(dropped_train),
        "files": prints,
    }
    return artifacts


def _training_files(sch: TableSchema, files: list[Path], root: Path | None) -> list[Path]:
    """The files that may hold training rows: under a ``partition`` split on a Hive partition
    key, those whose value is at most ``split.last[0]`` (partition pruning); else all."""
    if sch.split.kind is not SplitKind.PARTITION or root is None or sch.split.last is None:
        return files
    out = []
    for f in files:
        value = _t.partition_values(root, f).get(sch.split.column or "", "")
        if value is None or value == "" or value <= sch.split.last[0]:
            out.append(f)  # not a partition key here, or a training partition (an empty value errs later)
    return out
