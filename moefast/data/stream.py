"""The streamed tabular source (issue 26): a Parquet log read a row group at a time, through the
in-memory source's reading layer (:func:`moefast.data.table.parquet_dataset`: one
``pyarrow.dataset`` of the files, Hive partitions parsed by pyarrow, each row group a fragment).

:func:`open_stream` takes a log, its schema and the first pass's artifacts
(:func:`moefast.data.firstpass.first_pass`, ``vocab.json``) and returns a
:class:`StreamedDataset`: the feature specs, domain names, numeric specs and pretrained tables
of the first pass, and ``train`` / ``val`` / ``test`` as :class:`StreamedSplit` s, which hold no
rows. Before anything is read the file list is checked against the first pass's fingerprint
(a file added, deleted, truncated or rewritten is a located error).

Rows are encoded by the in-memory source's own functions, chunk by chunk, under the saved
vocabularies (:func:`encode`, each field's a lookup built once per source): the same raw row
gets the same ids, values, domain and split.

:class:`StreamLoader` turns a split into mini-batches (the ``mixed`` order):

- the **units** are Parquet row groups (``ParquetFileFragment.split_by_row_group``, read with
  column projection by :func:`moefast.data.table.fragment_chunks`); each epoch visits them in a
  seeded order (``fragment_order="seeded"``) or in stored order (``"stored"``: files sorted,
  row groups in file order, the in-memory source's row order);
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
  the files of those domains are opened (partition pruning: a filter on the dataset's partition
  key); otherwise a domain-restricted stream is refused with one line saying to partition the
  log by domain (a filter on an unsorted log would read every row group once per expert epoch).

Memory: at most ``shuffle_rows`` + one row group + one batch of encoded rows, plus one record
batch of raw values while a row group is encoded.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from moefast.config import FeatureSpec, NumericSpec, Pooling
from moefast.data import table as _t
from moefast.data.batching import BatchOrder
from moefast.data.dataset import Batch, check_pretrained_table
from moefast.data.firstpass import check_fingerprint, check_layout, stream_files
from moefast.data.schema import DOMAIN_FIELD, SplitKind, TableSchema, load_schema

__all__ = ["READ_AHEAD_CAP", "SHUFFLE_ROWS", "StreamLoader", "StreamedDataset", "StreamedSplit", "default_read_ahead",
           "encode", "load_stream", "open_stream"]

# The shuffle buffer's default, in rows. It changes results: never sized from memory.
SHUFFLE_ROWS = 1 << 18
# The read-ahead window's cap, in bytes (speed only; default_read_ahead).
READ_AHEAD_CAP = 256 << 20
FRAGMENT_ORDERS = ("seeded", "stored")
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Encoded:
    """The encoded rows of one chunk (the rows of one split, dropped domains removed), and their
    ``key`` column as text when asked for (scores written with their keys)."""

    features: dict[str, np.ndarray]
    domain: np.ndarray
    label: np.ndarray
    key: pa.Array | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.features.values()) + self.domain.nbytes + self.label.nbytes
                   + (self.key.nbytes if self.key is not None else 0))


def encode(sch: TableSchema, art: Mapping[str, Any], chunk: Any, part: int | None,
           lookups: Mapping[str, _t.SavedField] | None = None, keys: bool = False) -> Encoded:
    """Encode one chunk (:class:`moefast.data.table._Chunk`) under the saved artifacts ``art``
    with the in-memory source's functions, keeping the rows of split ``part`` (None: all).
    ``lookups``: each field's :class:`~moefast.data.table.SavedField`, built once per source
    (:func:`lookups_of`; None: built here, for this chunk). ``keys``: also the schema's ``key``
    column, as text (as the in-memory load passes it through to ``info["keys"]``)."""
    if lookups is None:
        lookups = lookups_of(sch, art)
    rows = _t._Rows()
    n = len(next(iter(chunk.columns.values()))) if chunk.columns else 0
    rows.add(chunk, n)
    dcodes = _t._Codes()
    local = dcodes.add_single(chunk.columns[sch.domain.column], _t._Place(chunk.path, chunk.first_row, sch.domain.column))
    if (local < 0).any():
        i = int(np.flatnonzero(local < 0)[0])
        raise _t.TableError(chunk.path, chunk.first_row + i, sch.domain.column, "empty domain value")
    domain, _, _, keep = _t._domains(sch, dcodes.dicts[0].to_pylist(), local.astype(np.int64), rows, dict(art))
    if sch.label is not None and sch.label in chunk.columns:
        label = _t._label(chunk, sch.label, sch.label_threshold)
    else:
        label = np.zeros(n, np.float32)  # data to score
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
        # One chunk: its own dictionary and codes (a value the trimming made twice gets one id).
        features[spec.name] = lookups[spec.name].ids(codes.dicts[0], codes.local[0][take])
    if sch.domain.feature:
        features[DOMAIN_FIELD] = domain[take].astype(np.int64)
    for nspec in sch.numeric:
        raw = _t.finite_floats(chunk, nspec.column)
        values, _ = _t._numeric(nspec, raw, keep, rows, art["numeric"][nspec.name])
        features[nspec.name] = values[take]
        if nspec.indicator:
            features[f"{nspec.name}_missing"] = np.isnan(raw[take]).astype(np.float32)
    key = None
    if keys and sch.key is not None:
        key = _t._as_text(chunk.columns[sch.key], _t._Place(chunk.path, chunk.first_row, sch.key)).take(
            pa.array(take, pa.int64()))
    return Encoded(features, domain[take].astype(np.int64), label[take].astype(np.float32), key)


def lookups_of(sch: TableSchema, art: Mapping[str, Any]) -> dict[str, _t.SavedField]:
    """Each categorical field's saved vocabulary as a lookup (:class:`~moefast.data.table.SavedField`)."""
    return {spec.name: _t.SavedField.of(art["categorical"][spec.name]) for spec in sch.categorical}


@dataclass(frozen=True)
class Unit:
    """One Parquet row group: the file, the group's index, its rows, the file's domain when the
    domain column is a partition key (None otherwise), the data row of the file it starts at,
    the file's Hive partition values and the group's ``pyarrow.dataset`` fragment
    (``ParquetFileFragment.split_by_row_group``, which keeps the file's footer: a row group is
    read without parsing the footer again)."""

    path: Path
    group: int
    rows: int
    domain: int | None
    first_row: int = 1
    partition: Mapping[str, str | None] = field(default_factory=dict, compare=False, repr=False)
    fragment: Any = field(default=None, compare=False, repr=False)


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
        if domains is not None:
            src.check_domain_reads("single-domain batches, an expert stage")
        units = src.all_units
        if domains is not None:
            # Partition pruning: pyarrow.dataset evaluates a filter on the domain column's
            # partition values and lists only the matching files' fragments.
            import pyarrow.dataset as pads

            wanted = set(domains)
            values = sorted({str(u.partition[src.schema.domain.column]) for u in units if u.domain in wanted})
            kept = {str(f.path) for f in src.dataset.get_fragments(
                filter=pads.field(src.schema.domain.column).isin(values))}
            units = tuple(u for u in units if str(u.path) in kept)
        return [u for u in units if src.may_hold(u, self.index)]

    def chunks(self, units: Sequence[Unit], keys: bool = False) -> Iterator[Encoded]:
        """The encoded rows of this split in ``units``, one row group at a time (``keys``: with
        the schema's key column). A read that fails without a row to name (a file truncated or
        deleted since it was opened) names the row group."""
        src = self.source
        part = None if src.scoring else self.index
        for u in units:
            try:
                for chunk in _t.fragment_chunks(u.fragment, u.path, u.first_row, list(src.columns), src.optional,
                                                src.coded, u.partition):
                    enc = encode(src.schema, src.artifacts, chunk, part, src.lookups, keys)
                    if len(enc):
                        yield enc
            except _t.TableError as exc:
                if exc.row is not None:
                    raise
                if not u.path.exists():
                    raise _t.TableError(u.path, None, None, f"row group {u.group}: deleted while the log was "
                                        "read") from None
                problem = str(exc).split(": ", 1)[-1]
                raise _t.TableError(u.path, None, exc.column, f"row group {u.group}: {problem}") from None


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
    # The files as one pyarrow.dataset (moefast.data.table.parquet_dataset): partition pruning.
    dataset: Any = field(default=None, compare=False, repr=False)
    # Each field's saved vocabulary as a lookup, built once (lookups_of): every row group uses it.
    lookups: Mapping[str, _t.SavedField] = field(default_factory=dict, compare=False, repr=False)
    domain_partitioned: bool = False
    columns: tuple[str, ...] = ()
    coded: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    # How it is read: the shuffle buffer and the row groups' order change results (recorded in
    # settings.json), the read-ahead window does not; ``shards`` None: one per data-parallel rank.
    shuffle_rows: int = SHUFFLE_ROWS
    fragment_order: str = "seeded"
    shards: int | None = None
    read_ahead: int = 0
    scoring: bool = False
    _splits: dict[str, StreamedSplit] = field(default_factory=dict, compare=False, repr=False)

    def check_domain_reads(self, why: str) -> None:
        """Refuse (``ValueError`` naming the log) reading one domain's rows, which ``why`` needs,
        from a log not partitioned by its domain column: the filter would read every row group
        once per expert epoch."""
        if not self.domain_partitioned:
            raise ValueError(f"{self.root or self.files[0]}: reading one domain's rows ({why}) needs the log "
                             f"partitioned by its domain column ({self.schema.domain.column}=VALUE folders); a "
                             "filter on an unsorted log would read every row group once per expert epoch")

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

    def may_hold(self, unit: Unit, part: int) -> bool:
        """False when a ``partition`` split on a partition key puts the unit's whole file elsewhere."""
        sp = self.schema.split
        if self.scoring:
            return part == 2  # data to score: every row is in the test split
        if sp.kind is not SplitKind.PARTITION or self.root is None or sp.last is None:
            return True
        value = unit.partition.get(sp.column or "")
        if not value:
            return True
        got = 0 if value <= sp.last[0] else 1 if value <= sp.last[1] else 2
        return got == part


def _check_reading(shuffle_rows: object, read_ahead: object, fragment_order: object, shards: object) -> None:
    """How a stream is read, checked before any file is (``ValueError`` naming the value)."""
    if shuffle_rows is not None and (isinstance(shuffle_rows, bool) or not isinstance(shuffle_rows, int)
                                     or shuffle_rows < 1):
        raise ValueError(f"the shuffle buffer must be a positive number of rows, got {shuffle_rows!r}")
    if read_ahead is not None and (isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or read_ahead < 0):
        raise ValueError(f"the read-ahead window must be a number of bytes >= 0, got {read_ahead!r}")
    if fragment_order not in FRAGMENT_ORDERS:
        raise ValueError(f"fragment_order must be 'seeded' or 'stored', got {fragment_order!r}")
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
        raise ValueError(f"shards must be a positive int or None, got {shards!r}")


def open_stream(path: str | os.PathLike[str], schema: str | os.PathLike[str] | TableSchema | Mapping[str, Any],
                vocab: str | os.PathLike[str] | Mapping[str, Any], *, shuffle_rows: int | None = None,
                fragment_order: str = "seeded", shards: int | None = None, read_ahead: int | None = None,
                scoring: bool = False, check_files: bool = True) -> StreamedDataset:
    """A :class:`StreamedDataset` over the Parquet log ``path`` under the first pass ``vocab``
    (a ``vocab.json``, a run directory, or the artifacts dict).

    ``shuffle_rows`` (default :data:`SHUFFLE_ROWS`), ``fragment_order`` and ``shards`` (default:
    one per data-parallel rank) say how training reads it and change results;
    ``read_ahead`` (bytes, default :func:`default_read_ahead`) only its speed. ``scoring``:
    data to score (a schema without a label implies it): every row is in the test split, and the
    files need not be the first pass's. ``check_files=False`` reads files other than the first
    pass's (scoring a split of new data under a run's vocabularies: ``moefast predict``)."""
    sch = load_schema(schema)
    scoring = scoring or sch.label is None
    files, root = stream_files(path, sch, scoring=scoring)
    if isinstance(vocab, Mapping):
        art, where = dict(vocab), "the first pass"
    else:
        saved, file = _t.read_vocab(vocab)
        art, where = saved, str(file)
        _t._check_same_fields(sch, saved, file)
    if not scoring and "stream" not in art and check_files:
        raise ValueError(f"{where}: no file fingerprint (written by the in-memory source); run `moefast vocab` "
                         "on this log")
    _check_reading(shuffle_rows, read_ahead, fragment_order, shards)
    coded = frozenset({sch.domain.column, *(c.column for c in sch.categorical if not c.multi)})
    # One pyarrow.dataset over the files: their footers are read once here (the fingerprint, the
    # layout, the row groups) and kept by the fragments, which the epochs read.
    dataset = _t.parquet_dataset(files, root, coded)
    fragments = list(dataset.get_fragments())
    metas = [_t.footer(frag, f) for frag, f in zip(fragments, files, strict=True)]
    if not scoring and check_files:
        check_fingerprint(art["stream"]["files"], files, root, where, metas)
    check_layout(files, root, sch.columns(), metas)
    domain_map: Mapping[str, int] = art["domains"]["values"]
    other = art["domains"].get("other")
    partitioning = dataset.partitioning
    partitioned = partitioning is not None and sch.domain.column in partitioning.schema.names
    units = []
    for f, frag in zip(files, fragments, strict=True):
        partition = {} if partitioning is None else _t.partition_keys(frag.partition_expression, partitioning)
        dom = None
        if partitioned:
            raw = partition[sch.domain.column]
            dom = domain_map.get(raw or "", other if other is not None else -1)
        first = 1
        for group in frag.split_by_row_group():
            (info,) = group.row_groups
            units.append(Unit(f, info.id, info.num_rows, dom, first, partition, group))
            first += info.num_rows
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
    optional = frozenset(c for c in (sch.label, sch.split.column) if c is not None and scoring)
    # The same source name as the in-memory table. Scoring across the two is refused, not
    # silently wrong: the vocabulary digest differs (the first pass records more keys, and a
    # bag's width is the schema's max_len here), so `moefast predict` asks for --vocab-from.
    info = {"source": "table", "stream": True, "files": [str(f) for f in files], "table": art}
    ds = StreamedDataset(
        name=name, features=tuple(specs), domain_names=tuple(art["domains"]["names"]), numeric=tuple(numeric),
        pretrained=pretrained, info=info, schema=sch, artifacts=art, files=tuple(files), root=root,
        all_units=tuple(units), dataset=dataset, lookups=lookups_of(sch, art), domain_partitioned=partitioned, columns=tuple(sch.columns()), coded=coded,
        optional=optional, shuffle_rows=SHUFFLE_ROWS if shuffle_rows is None else shuffle_rows,
        fragment_order=fragment_order, shards=shards,
        read_ahead=default_read_ahead() if read_ahead is None else read_ahead, scoring=scoring,
    )
    if scoring or "stream" not in art or not check_files:  # row counts of these files' splits are unknown
        rows = {"train": 0, "val": 0, "test": sum(u.rows for u in units)} if scoring else {s: 0 for s in _SPLITS}
    else:
        rows = art["stream"]["rows"]
    for i, s in enumerate(_SPLITS):
        ds._splits[s] = StreamedSplit(ds, i, int(rows[s]))
    return ds


def default_read_ahead() -> int:
    """The read-ahead window's default, in bytes: an eighth of the memory available when asked,
    at most :data:`READ_AHEAD_CAP`. Speed only: the window never changes which rows come in
    which batch."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no window
        return 0
    return int(min(READ_AHEAD_CAP, max(available // 8, 0)))


def _read_ahead(chunks: Iterator[Encoded], window: int) -> Iterator[Encoded]:
    """``chunks`` in their order, read and encoded by a background thread up to ``window`` bytes
    ahead of the consumer (at least one chunk); ``window`` 0 reads in the consumer's thread.
    pyarrow's reads and numpy's gathers release the GIL, so reading overlaps training."""
    if window <= 0:
        yield from chunks
        return
    cond = threading.Condition()
    queue: deque[Encoded | BaseException | None] = deque()
    state = {"held": 0, "stop": False}

    def produce() -> None:
        last: BaseException | None = None
        try:
            for enc in chunks:
                with cond:
                    while queue and state["held"] >= window and not state["stop"]:
                        cond.wait()
                    if state["stop"]:
                        return
                    queue.append(enc)
                    state["held"] += enc.nbytes
                    cond.notify_all()
        except BaseException as exc:  # handed to the consumer, raised in its thread
            last = exc
        with cond:
            queue.append(last)
            cond.notify_all()

    thread = threading.Thread(target=produce, name="moefast-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                while not queue:
                    cond.wait()
                item = queue.popleft()
                if isinstance(item, Encoded):
                    state["held"] -= item.nbytes
                cond.notify_all()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()


class StreamLoader:
    """Mini-batches of a :class:`StreamedSplit` (the module docstring); each ``iter()`` is one
    epoch.

    Args:
        split: the rows.
        batch_size: rows per (global) batch; shard ``s`` of ``shards`` contributes ``batch_size
            // shards`` rows, one more for the first ``batch_size % shards`` shards.
        order: ``MIXED`` (rows of every domain through the shuffle buffer), ``BY_DOMAIN`` (the
            domains in a seeded order, each read alone through the buffer: needs the log
            partitioned by domain) or ``SEQUENTIAL`` (stored order, no shuffle: evaluation; the
            generator is not used, the shards are read one after another).
        shuffle_rows: the shuffle buffer, in rows per shard (changes results).
        fragment_order: ``seeded`` (the row groups in a seeded order each epoch) or ``stored``.
        domains: only those domains' rows (``None``: every domain).
        generator: a ``torch.Generator`` (one draw per epoch) or an int seed.
        shards / take: the epoch's row groups are dealt round-robin to ``shards`` shards; this
            loader reads the shards ``take`` (default all of them). A training step is the
            concatenation, in shard order, of each shard's next local batch, and the epoch ends
            when one of them has none left (the remainder rule, docs/data.md): a data-parallel
            rank reads one shard (``take=[rank]``) and the ranks agree on the end; one process
            reading every shard computes the same steps.
        skip: batches the first epoch drops without building them (a resume).
        read_ahead: bytes of encoded row groups read ahead by a background thread (speed only).
        keys: also read the schema's ``key`` column (:meth:`keyed`).
    """

    def __init__(self, split: StreamedSplit, batch_size: int, *, order: BatchOrder = BatchOrder.MIXED,
                 shuffle_rows: int = SHUFFLE_ROWS, fragment_order: str = "seeded",
                 domains: Sequence[int] | None = None, generator: torch.Generator | int | None = None,
                 drop_last: bool = False, shards: int = 1, take: Sequence[int] | None = None, skip: int = 0,
                 read_ahead: int = 0, keys: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(order, BatchOrder):
            raise TypeError(f"order must be a BatchOrder, got {order!r}")
        if fragment_order not in FRAGMENT_ORDERS:
            raise ValueError(f"fragment_order must be 'seeded' or 'stored', got {fragment_order!r}")
        if isinstance(shuffle_rows, bool) or not isinstance(shuffle_rows, int) or shuffle_rows < 1:
            raise ValueError(f"the shuffle buffer must be a positive number of rows, got {shuffle_rows!r}")
        if shards < 1 or batch_size < shards:
            raise ValueError(f"a batch of {batch_size} rows cannot be split over {shards} shards (each needs a row)")
        take = list(range(shards)) if take is None else list(take)
        if not take or any(not 0 <= s < shards for s in take) or len(set(take)) != len(take):
            raise ValueError(f"take={take} must name distinct shards in [0, {shards})")
        self.split, self.batch_size, self.order, self.shuffle_rows = split, batch_size, order, shuffle_rows
        self.fragment_order, self.drop_last, self.skip, self.read_ahead = fragment_order, drop_last, skip, read_ahead
        self.shards, self.take, self.keys = shards, take, keys
        self.domains = None if domains is None else tuple(sorted(set(domains)))
        if isinstance(generator, torch.Generator):
            self.generator = generator
        else:
            self.generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
        # BY_DOMAIN reads one domain at a time: every domain's row groups must be known apart.
        every = self.domains if self.domains is not None else tuple(range(split.source.num_domains))
        self._units = split.units(every if order is BatchOrder.BY_DOMAIN or self.domains is not None else None)

    @property
    def reads_apart(self) -> bool:
        """Whether other loaders (the other ranks) read the rest of each step's global batch."""
        return len(self.take) < self.shards

    @property
    def num_rows(self) -> int | None:
        """Rows per epoch when known without reading (every shard, every domain), else None."""
        return self.split.rows if self.domains is None and not self.reads_apart else None

    def epoch_units(self, seed: int | None, shard: int = 0, domains: Sequence[int] | None = None) -> list[Unit]:
        """Shard ``shard``'s row groups of the epoch seeded ``seed`` (``None``: stored order), of
        ``domains`` (default: the loader's)."""
        units = self._units
        if domains is not None:
            wanted = set(domains)
            units = [u for u in units if u.domain in wanted]
        if seed is not None and self.fragment_order == "seeded":
            order = np.random.default_rng([seed, 1]).permutation(len(units))
            units = [units[i] for i in order]
        return list(units[shard::self.shards])

    def __iter__(self) -> Iterator[Batch]:
        return (_batch(enc) for enc in self._epoch())

    def keyed(self) -> Iterator[tuple[Batch, pa.Array | None]]:
        """One epoch's batches with their rows' keys (text; None when the loader reads no keys
        or the schema has no ``key``)."""
        return ((_batch(enc), enc.key) for enc in self._epoch())

    def _epoch(self) -> Iterator[Encoded]:
        skip, self.skip = self.skip, 0  # a resume skips once, in its first epoch
        steps: Iterator[Encoded]
        if self.order is BatchOrder.SEQUENTIAL:
            units = [u for s in self.take for u in self.epoch_units(None, s)]
            steps = self._emit(self._chunks(units, self.domains), None, self.batch_size)
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            if self.order is BatchOrder.MIXED:
                steps = self._steps(seed, self.domains)
            else:
                every = self.domains if self.domains is not None else tuple(range(self.split.source.num_domains))
                plan = [every[k] for k in np.random.default_rng(seed).permutation(len(every))]
                steps = itertools.chain.from_iterable(
                    self._steps(int(np.random.default_rng([seed, 3, d]).integers(2**62)), [d]) for d in plan)
        for done, enc in enumerate(steps, start=1):
            if done > skip:
                yield enc

    def _chunks(self, units: Sequence[Unit], domains: Sequence[int] | None) -> Iterator[Encoded]:
        chunks = self.split.chunks(units, self.keys)
        if domains is not None:
            wanted = np.asarray(sorted(domains), dtype=np.int64)
            chunks = (_take(enc, np.flatnonzero(np.isin(enc.domain, wanted))) for enc in chunks)
        return _read_ahead(chunks, self.read_ahead)

    def _steps(self, seed: int, domains: Sequence[int] | None) -> Iterator[Encoded]:
        """The epoch's steps over ``domains``: each shard's local batches, in lockstep. The rows
        of shard 0 are shuffled by ``default_rng(seed)`` (one shard, MIXED: exactly
        :class:`~moefast.data.batching.BatchLoader`'s draw), shard ``s`` by ``[seed, 2, s]``."""
        base, extra = divmod(self.batch_size, self.shards)
        streams: list[Generator[Encoded, None, None]] = []
        for s in self.take:
            rng = np.random.default_rng(seed if s == 0 else [seed, 2, s])
            units = self.epoch_units(seed, s, domains)
            streams.append(self._emit(self._chunks(units, domains), rng, base + (1 if s < extra else 0)))
        try:
            while True:
                parts = []
                for stream in streams:
                    part = next(stream, None)
                    if part is None:
                        return
                    parts.append(part)
                yield _concat(parts)
        finally:
            for stream in streams:
                stream.close()

    def _emit(self, chunks: Iterator[Encoded], rng: np.random.Generator | None,
              size: int) -> Generator[Encoded, None, None]:
        """Batches of ``size`` rows of ``chunks``: through the shuffle buffer (``rng``), or in
        order (``None``)."""
        buffer: list[Encoded] = []
        held = 0
        limit = self.shuffle_rows if rng is not None else size
        try:
            for enc in chunks:
                buffer.append(enc)
                held += len(enc)
                if held >= limit:
                    rest, batches = self._flush(buffer, rng, size, last=False)
                    yield from batches
                    buffer, held = [rest], len(rest)
            _, batches = self._flush(buffer, rng, size, last=True)
            yield from batches
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _flush(self, buffer: list[Encoded], rng: np.random.Generator | None, size: int, *,
               last: bool) -> tuple[Encoded, list[Encoded]]:
        whole = _concat(buffer)
        n = len(whole)
        if rng is not None:
            whole = _take(whole, rng.permutation(n))
        stop = n if last and not self.drop_last else n - n % size
        batches = [_take(whole, np.arange(s, min(s + size, stop))) for s in range(0, stop, size)]
        return _take(whole, np.arange(stop, n)), batches


def _take(enc: Encoded, rows: np.ndarray) -> Encoded:
    key = None if enc.key is None else enc.key.take(pa.array(rows, pa.int64()))
    return Encoded({k: v[rows] for k, v in enc.features.items()}, enc.domain[rows], enc.label[rows], key)


def _concat(parts: list[Encoded]) -> Encoded:
    parts = [p for p in parts if len(p)] or parts[:1]
    if not parts:
        return Encoded({}, np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(parts) == 1:
        return parts[0]
    key = None if parts[0].key is None else pa.concat_arrays([p.key for p in parts if p.key is not None])
    return Encoded({k: np.concatenate([p.features[k] for p in parts]) for k in parts[0].features},
                   np.concatenate([p.domain for p in parts]), np.concatenate([p.label for p in parts]), key)


def _batch(enc: Encoded) -> Batch:
    return Batch({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in enc.features.items()},
                 torch.from_numpy(np.ascontiguousarray(enc.domain)), torch.from_numpy(np.ascontiguousarray(enc.label)))


def load_stream(*, path: str | os.PathLike[str], schema: str | os.PathLike[str] | TableSchema | Mapping[str, Any],
                vocab_from: str | os.PathLike[str] | None = None, shuffle_rows: int | None = None,
                read_ahead: int | None = None, fragment_order: str = "seeded", shards: int | None = None,
                scoring: bool = False, check_files: bool = True, progress: bool | None = None) -> StreamedDataset:
    """``moefast.data.load("table", stream=True, ...)``: the first pass over the log's training
    split (:func:`moefast.data.firstpass.first_pass`; ``vocab_from``: a ``vocab.json`` or a run
    directory whose first pass is reused), then :func:`open_stream`. No dataset cache: hashing the
    content of a log larger than memory is no option; the file fingerprint stands in for it."""
    from moefast.data.firstpass import first_pass

    _check_reading(shuffle_rows, read_ahead, fragment_order, shards)  # not after a pass over the whole log
    if vocab_from is None:
        if scoring or load_schema(schema).label is None:
            raise ValueError("scoring data (no label) needs vocab_from=<the run directory whose model scores it>")
        vocab: str | os.PathLike[str] | Mapping[str, Any] = first_pass(path, schema, progress=progress)
    else:
        vocab = vocab_from
    return open_stream(path, schema, vocab, shuffle_rows=shuffle_rows, read_ahead=read_ahead,
                       fragment_order=fragment_order, shards=shards, scoring=scoring, check_files=check_files)
