"""The streamed tabular source (issue 26): a Parquet log read a row group at a time.

:func:`open_stream` takes a log, its schema and the first pass's artifacts
(:func:`moefast.data.firstpass.first_pass`, ``vocab.json``) and returns a
:class:`StreamedDataset`: the feature specs, domain names, numeric specs and pretrained tables
of the first pass, and ``train`` / ``val`` / ``test`` as :class:`StreamedSplit` s, which hold no
rows. Before anything is read the file list is checked against the first pass's fingerprint
(a file added, deleted, truncated or rewritten is a located error).

Rows are encoded by the in-memory source's own functions, chunk by chunk, under the saved
vocabularies (:func:`encode`): the same raw row gets the same ids, values, domain and split.

:class:`StreamLoader` turns a split into mini-batches (the ``mixed`` order):

- the **units** are Parquet row groups; each epoch visits them in a seeded order
  (``fragment_order="seeded"``) or in stored order (``"stored"``: files sorted, row groups in
  file order, the in-memory source's row order);
- a **shuffle buffer** of ``shuffle_rows`` rows: rows of the next units are added until the
  buffer holds ``shuffle_rows``; then it is permuted and emptied in batches, the incomplete
  last batch's rows staying for the next fill. It changes results: its default
  (:data:`SHUFFLE_ROWS`) is fixed. A buffer at least as large as the split permutes the whole
  split once, exactly as :class:`~moefast.data.batching.BatchLoader` does in ``mixed`` order
  with the same generator (the parity of the two sources);
- each epoch takes one draw from the generator (as ``BatchLoader``): it seeds the row
  permutations, and (keyed ``[seed, 1]``) the unit order, so an epoch replays from the
  generator's state at its start; ``skip`` drops the first batches without building them
  (resume);
- ``rank`` / ``world``: the epoch's units are dealt round-robin to the ranks (after the seeded
  order), so ranks read disjoint row groups whose union is the split; no rank reads everything;
- ``domains``: only those domains' rows. When the domain column is a Hive partition key, only
  the files of those domains are opened (partition pruning); otherwise a domain-restricted
  stream is refused with one line saying to partition the log by domain (a filter on an
  unsorted log would read every row group once per expert epoch).

Memory: at most ``shuffle_rows`` + one row group + one batch of encoded rows, plus one record
batch of raw values while a row group is encoded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from moefast.config import FeatureSpec, NumericSpec, Pooling
from moefast.data import table as _t
from moefast.data.dataset import Batch, check_pretrained_table
from moefast.data.firstpass import check_fingerprint, stream_files
from moefast.data.schema import DOMAIN_FIELD, SplitKind, TableSchema, load_schema

__all__ = ["SHUFFLE_ROWS", "StreamLoader", "StreamedDataset", "StreamedSplit", "encode", "open_stream"]

# The shuffle buffer's default, in rows. It changes results: never sized from memory.
SHUFFLE_ROWS = 1 << 18
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Encoded:
    """The encoded rows of one chunk (the rows of one split, dropped domains removed)."""

    features: dict[str, np.ndarray]
    domain: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])


def encode(sch: TableSchema, art: Mapping[str, Any], chunk: Any, part: int | None) -> Encoded:
    """Encode one chunk (:class:`moefast.data.table._Chunk`) under the saved artifacts ``art``
    with the in-memory source's functions, keeping the rows of split ``part`` (None: all)."""
    rows = _t._Rows()
    n = len(next(iter(chunk.columns.values()))) if chunk.columns else 0
    rows.add(chunk, n)
    dcodes = _t._Codes()
    local = dcodes.add_single(chunk.columns[sch.domain.column], _t._Place(chunk.path, chunk.first_row, sch.domain.column))
    if (local < 0).any():
        i = int(np.flatnonzero(local < 0)[0])
        raise _t.TableError(chunk.path, chunk.first_row + i, sch.domain.column, "empty domain value")
    domain, _, _, keep = _t._domains(sch, dcodes.dicts[0].to_pylist(), local.astype(np.int64), rows, dict(art))
    label = _t._label(chunk, sch.label, sch.label_threshold) if sch.label is not None else np.zeros(n, np.float32)
    if part is not None:
        keep &= _t.chunk_split(sch, chunk) == part
    take = np.flatnonzero(keep)
    features: dict[str, np.ndarray] = {}
    for spec in sch.categorical:
        codes = _t._Codes()
        arr = chunk.columns[spec.column]
        if spec.multi:
            codes.add_multi(arr, spec, chunk)
        else:
            codes.add_single(arr, _t._Place(chunk.path, chunk.first_row, spec.column))
        uniques, c = codes.merge()
        if spec.multi:
            c = c.reshape(n, spec.max_len)
        ids, _ = _t._vocabulary(spec, uniques, c[take], 0, art["categorical"][spec.name])
        features[spec.name] = ids.astype(np.int64)
    if sch.domain.feature:
        features[DOMAIN_FIELD] = domain[take].astype(np.int64)
    for nspec in sch.numeric:
        raw = _t._as_float(chunk, nspec.column)
        bad = np.isinf(raw)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _t.TableError(chunk.path, chunk.first_row + i, nspec.column, f"not a finite number: {raw[i]}")
        values, _ = _t._numeric(nspec, raw, keep, rows, art["numeric"][nspec.name])
        features[nspec.name] = values[take]
        if nspec.indicator:
            features[f"{nspec.name}_missing"] = np.isnan(raw[take]).astype(np.float32)
    return Encoded(features, domain[take].astype(np.int64), label[take].astype(np.float32))


@dataclass(frozen=True)
class Unit:
    """One Parquet row group: the file, the group's index, its rows, and the file's domain when
    the domain column is a partition key (None otherwise)."""

    path: Path
    group: int
    rows: int
    domain: int | None


@dataclass(frozen=True)
class StreamedSplit:
    """One split of a streamed log: no rows, only where they are."""

    source: StreamedDataset
    index: int  # 0 train, 1 val, 2 test
    rows: int  # from the first pass (train, val, test)

    def __len__(self) -> int:
        return self.rows

    @property
    def name(self) -> str:
        return _SPLITS[self.index]

    def units(self, domains: Sequence[int] | None = None) -> list[Unit]:
        """The row groups that may hold this split's rows (of ``domains``), in stored order."""
        src = self.source
        if domains is not None and not src.domain_partitioned:
            raise ValueError(f"{src.root or src.files[0]}: reading one domain's rows (single-domain batches, an expert "
                             f"stage) needs the log partitioned by its domain column ({src.schema.domain.column}=VALUE "
                             "folders); a filter on an unsorted log would read every row group once per expert epoch")
        wanted = None if domains is None else set(domains)
        out = []
        for u in src.all_units:
            if wanted is not None and u.domain not in wanted:
                continue
            if not src.may_hold(u.path, self.index):
                continue
            out.append(u)
        return out

    def chunks(self, units: Sequence[Unit]) -> Iterator[Encoded]:
        """The encoded rows of this split in ``units``, one row group at a time."""
        src = self.source
        for u in units:
            for chunk in _t._chunks([u.path], "parquet", list(src.columns), set(), src.coded, src.root, row_groups=[u.group]):
                enc = encode(src.schema, src.artifacts, chunk, self.index)
                if len(enc):
                    yield enc


@dataclass(frozen=True)
class StreamedDataset:
    """What ``models.build``, ``fit`` and ``predict`` need of a streamed log: the first pass's
    feature specs, domain names, numeric specs and pretrained tables, and the three splits as
    :class:`StreamedSplit` s."""

    name: str
    features: tuple[FeatureSpec, ...]
    domain_names: tuple[str, ...]
    numeric: tuple[NumericSpec, ...]
    pretrained: Mapping[str, torch.Tensor]
    info: Mapping[str, Any]
    schema: TableSchema
    artifacts: Mapping[str, Any]
    files: tuple[Path, ...]
    root: Path | None
    all_units: tuple[Unit, ...] = ()
    domain_partitioned: bool = False
    columns: tuple[str, ...] = ()
    coded: frozenset[str] = frozenset()
    _splits: dict[str, StreamedSplit] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def feature(self, name: str) -> FeatureSpec:
        for spec in self.features:
            if spec.name == name:
                return spec
        raise KeyError(f"dataset {self.name!r} has no feature {name!r}")

    @property
    def train(self) -> StreamedSplit:
        return self._splits["train"]

    @property
    def val(self) -> StreamedSplit:
        return self._splits["val"]

    @property
    def test(self) -> StreamedSplit:
        return self._splits["test"]

    def may_hold(self, path: Path, part: int) -> bool:
        """False when a ``partition`` split on a partition key puts the whole file elsewhere."""
        sp = self.schema.split
        if sp.kind is not SplitKind.PARTITION or self.root is None or sp.last is None:
            return True
        value = _t.partition_values(self.root, path).get(sp.column or "")
        if not value:
            return True
        got = 0 if value <= sp.last[0] else 1 if value <= sp.last[1] else 2
        return got == part


def open_stream(path: str | os.PathLike[str], schema: str | os.PathLike[str] | TableSchema | Mapping[str, Any],
                vocab: str | os.PathLike[str] | Mapping[str, Any]) -> StreamedDataset:
    """A :class:`StreamedDataset` over the Parquet log ``path`` under the first pass ``vocab``
    (a ``vocab.json``, a run directory, or the artifacts dict)."""
    import pyarrow.parquet as pq

    sch = load_schema(schema)
    files, root = stream_files(path, sch)
    if isinstance(vocab, Mapping):
        art, where = dict(vocab), "the first pass"
    else:
        saved, file = _t.read_vocab(vocab)
        art, where = saved, str(file)
        _t._check_same_fields(sch, saved, file)
    if "stream" not in art:
        raise ValueError(f"{where}: no file fingerprint (written by the in-memory source); run `moefast vocab` "
                         "on this log")
    check_fingerprint(art["stream"]["files"], files, root, where)
    domain_map: Mapping[str, int] = art["domains"]["values"]
    partitioned = root is not None and all(sch.domain.column in _t.partition_values(root, f) for f in files)
    units = []
    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise _t.TableError(f, None, None, f"not a readable Parquet file ({exc})") from None
        dom = None
        if partitioned and root is not None:
            raw = _t.partition_values(root, f)[sch.domain.column]
            other = art["domains"].get("other")
            dom = domain_map.get(raw or "", other if other is not None else -1)
        for g in range(meta.num_row_groups):
            units.append(Unit(f, g, meta.row_group(g).num_rows, dom))
    specs = []
    for spec in sch.categorical:
        a = art["categorical"][spec.name]
        specs.append(FeatureSpec(spec.name, int(a["vocab_size"]), spec.dim, spec.pooling if spec.multi else Pooling.NONE))
    if sch.domain.feature:
        specs.append(FeatureSpec(DOMAIN_FIELD, len(art["domains"]["names"]), sch.dim))
    numeric = []
    for nspec in sch.numeric:
        numeric.append(NumericSpec(nspec.name))
        if nspec.indicator:
            numeric.append(NumericSpec(f"{nspec.name}_missing"))
    pretrained: dict[str, torch.Tensor] = {}
    for spec in sch.categorical:
        if spec.pretrained is not None:
            pretrained[spec.name] = _t._read_pretrained(_t._pretrained_path(sch, spec), spec, art["categorical"][spec.name])
    name = "table-" + (root.name if root is not None else files[0].name.split(".")[0])
    for k, table in pretrained.items():
        check_pretrained_table(next(s for s in specs if s.name == k), k, table, f"dataset {name!r}")
    coded = frozenset({sch.domain.column, *(c.column for c in sch.categorical if not c.multi)})
    ds = StreamedDataset(
        name=name, features=tuple(specs), domain_names=tuple(art["domains"]["names"]), numeric=tuple(numeric),
        pretrained=pretrained, info={"source": "table-stream", "files": [str(f) for f in files], "table": art},
        schema=sch, artifacts=art, files=tuple(files), root=root, all_units=tuple(units),
        domain_partitioned=partitioned, columns=tuple(sch.columns()), coded=coded,
    )
    rows = art["stream"]["rows"]
    for i, s in enumerate(_SPLITS):
        ds._splits[s] = StreamedSplit(ds, i, int(rows[s]))
    return ds


class StreamLoader:
    """Mini-batches of a :class:`StreamedSplit` (the module docstring): each ``iter()`` is one
    epoch, ``mixed`` order through a shuffle buffer of ``shuffle_rows`` rows, or in stored order
    without shuffling (``shuffle_rows=0``, evaluation; the generator is not used)."""

    def __init__(self, split: StreamedSplit, batch_size: int, *, shuffle_rows: int = SHUFFLE_ROWS,
                 fragment_order: str = "seeded", domains: Sequence[int] | None = None,
                 generator: torch.Generator | int | None = None, drop_last: bool = False,
                 rank: int = 0, world: int = 1, skip: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if fragment_order not in ("seeded", "stored"):
            raise ValueError(f"fragment_order must be 'seeded' or 'stored', got {fragment_order!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.split, self.batch_size, self.shuffle_rows = split, batch_size, shuffle_rows
        self.fragment_order, self.domains, self.drop_last = fragment_order, domains, drop_last
        self.rank, self.world, self.skip = rank, world, skip
        if isinstance(generator, torch.Generator):
            self.generator = generator
        else:
            self.generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
        self._units = split.units(domains)

    def epoch_units(self, seed: int | None) -> list[Unit]:
        """This rank's units of the epoch seeded ``seed`` (None: stored order)."""
        units = list(self._units)
        if seed is not None and self.fragment_order == "seeded":
            order = np.random.default_rng([seed, 1]).permutation(len(units))
            units = [units[i] for i in order]
        return units[self.rank::self.world]

    def __iter__(self) -> Iterator[Batch]:
        skip, self.skip = self.skip, 0  # a resume skips once, in its first epoch
        if not self.shuffle_rows:
            yield from self._emit(self.split.chunks(self.epoch_units(None)), None, skip)
            return
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        yield from self._emit(self.split.chunks(self.epoch_units(seed)), np.random.default_rng(seed), skip)

    def _emit(self, chunks: Iterator[Encoded], rng: np.random.Generator | None, skip: int) -> Iterator[Batch]:
        buffer: list[Encoded] = []
        held = 0
        done = 0
        wanted = None if self.domains is None else np.asarray(sorted(self.domains), dtype=np.int64)
        for enc in chunks:
            if wanted is not None:
                enc = _take(enc, np.flatnonzero(np.isin(enc.domain, wanted)))
            buffer.append(enc)
            held += len(enc)
            limit = self.shuffle_rows if rng is not None else self.batch_size
            if held >= limit:
                rest, batches = self._flush(buffer, rng, last=False)
                for b in batches:
                    done += 1
                    if done > skip:
                        yield b
                buffer, held = [rest], len(rest)
        _, batches = self._flush(buffer, rng, last=True)
        for b in batches:
            done += 1
            if done > skip:
                yield b

    def _flush(self, buffer: list[Encoded], rng: np.random.Generator | None, *, last: bool) -> tuple[Encoded, list[Batch]]:
        whole = _concat(buffer)
        n = len(whole)
        if rng is not None:
            whole = _take(whole, rng.permutation(n))
        stop = n if last and not self.drop_last else n - n % self.batch_size
        batches = [_batch(_take(whole, np.arange(s, min(s + self.batch_size, stop))))
                   for s in range(0, stop, self.batch_size)]
        return _take(whole, np.arange(stop, n)), batches


def _take(enc: Encoded, rows: np.ndarray) -> Encoded:
    return Encoded({k: v[rows] for k, v in enc.features.items()}, enc.domain[rows], enc.label[rows])


def _concat(parts: list[Encoded]) -> Encoded:
    parts = [p for p in parts if len(p)] or parts[:1]
    if not parts:
        return Encoded({}, np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(parts) == 1:
        return parts[0]
    return Encoded({k: np.concatenate([p.features[k] for p in parts]) for k in parts[0].features},
                   np.concatenate([p.domain for p in parts]), np.concatenate([p.label for p in parts]))


def _batch(enc: Encoded) -> Batch:
    return Batch({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in enc.features.items()},
                 torch.from_numpy(np.ascontiguousarray(enc.domain)), torch.from_numpy(np.ascontiguousarray(enc.label)))
