"""The schema of a tabular click log: which column is what (``docs/data.md``, "Your own data").

A :class:`TableSchema` is a frozen dataclass; :func:`load_schema` reads it from a TOML file and
:meth:`TableSchema.from_dict` from the same structure in Python. Every key is checked: an
unknown key, a wrong type or an impossible value is a ``ValueError`` naming the file and the key.

TOML shape (every table but ``[domain]`` optional)::

    label = "click"                 # absent: scoring data (no label)
    label_threshold = 0.5           # optional: label = 1 iff value >= threshold
    key = "request_id"              # optional pass-through key column (scoring)
    dim = 8                         # default embedding dim of every field

    [domain]
    column = "site"
    order = ["news", "video"]       # optional: the domain ids' order (default: sorted values)
    feature = true                  # the domain id is also an input field named "domain"
    max_domains = 100               # more distinct values than this: the policy applies
    min_rows = 1                    # a domain with fewer training rows: the policy applies
    policy = "error"                # error | drop | other
    other = "other"                 # the folded domain's name under policy "other"

    [categorical.user]              # field name; column defaults to it
    column = "user_id"
    dim = 8
    min_count = 1                   # values seen fewer times in train map to the OOV id
    missing = "own"                 # own (a dedicated missing id) | oov
    hash_buckets = 0                # > 0: hash into this many buckets instead of a vocabulary
    max_size = 0                    # > 0: keep the max_size most frequent values (ties by value)
    hash_seed = 0
    multi = false                   # multi-valued: a delimited string or a Parquet list
    delimiter = "|"
    max_len = 16                    # keep a bag's first max_len items
    pooling = "mean"                # sum | mean (multi-valued fields)
    pretrained = "user_vectors.csv" # raw value, then dim numbers per row (relative to this file)

    [numeric.price]
    column = "price"
    transform = "log1p"             # none | log1p | standardise | log1p-standardise
    fill = 0.0                      # a missing value, after the transform
    indicator = false               # add a 0/1 numeric field "price_missing"

    [split]
    kind = "random"                 # random (per domain, by label) | column | time | partition | hash
    fractions = [0.6, 0.2, 0.2]
    seed = 123
    column = "ds"                   # kind column: its values name the split
    values = ["train", "val", "test"]
    cuts = [20240101, 20240108]     # kind time: t < cuts[0] train, < cuts[1] val, else test
    last = ["2026-11-30", "2026-12-01"]  # kind partition: value <= last[0] train, <= last[1] val,
                                    # else test (text order of a Hive partition key's value)

Kind ``hash`` needs the top-level ``key``: a row is in train when ``stable_hash(key, seed) mod
10000 < round(10000 * fractions[0])``, in val below ``round(10000 * (fractions[0] +
fractions[1]))``, else in test (:func:`moefast.data.vocab.stable_hash`): the same row lands in
the same split whatever the files' order, and no full read is needed.
"""

from __future__ import annotations

import enum
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moefast.config import Pooling
from moefast.data.splits import DEFAULT_FRACTIONS, SPLIT_SEED
from moefast.data.vocab import RESERVED

__all__ = [
    "CategoricalColumn",
    "DomainColumn",
    "DomainPolicy",
    "MissingPolicy",
    "NumericColumn",
    "SplitKind",
    "SplitSpec",
    "TableSchema",
    "Transform",
    "load_schema",
]

# The field the domain id feeds when DomainColumn.feature is true (the seeds feed it).
DOMAIN_FIELD = "domain"

# Upper bounds of the size knobs (docs/data.md, "Size limits"), checked when the schema is
# built, before anything is read or allocated. A table is float32: rows x dim x 4 bytes, and the
# optimizers keep one or two more of it. max_len costs 4 bytes per bag slot per row while reading.
MAX_DIM = 4096
MAX_BAG = 1024
MAX_HASH_BUCKETS = 2**31 - 4  # ids 3 + bucket stay below 2**31
MAX_TABLE_BYTES = 64 << 30  # one field's float32 table


def human_bytes(count: float) -> str:
    """``count`` bytes as a short figure in binary units (``12.0 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(count) < 1024 or unit == "EiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def table_bytes(rows: int, dim: int) -> int:
    """Bytes of a float32 embedding table of ``rows`` x ``dim``."""
    return rows * dim * 4


class DomainPolicy(enum.Enum):
    """What happens to a domain over ``max_domains`` or under ``min_rows``: ``ERROR`` stops the
    load naming the domain; ``DROP`` removes its rows; ``OTHER`` folds them into one domain."""

    ERROR = "error"
    DROP = "drop"
    OTHER = "other"


class MissingPolicy(enum.Enum):
    """Where an empty categorical value goes: ``OWN`` its dedicated missing id (2), ``OOV`` the
    out-of-vocabulary id (1)."""

    OWN = "own"
    OOV = "oov"


class Transform(enum.Enum):
    """A numeric column's transform; ``standardise`` uses the training split's mean and std."""

    NONE = "none"
    LOG1P = "log1p"
    STANDARDISE = "standardise"
    LOG1P_STANDARDISE = "log1p-standardise"


class SplitKind(enum.Enum):
    RANDOM = "random"
    COLUMN = "column"
    TIME = "time"
    PARTITION = "partition"
    HASH = "hash"


# Kind hash: the hash's residue modulo this many buckets decides the split.
HASH_SPLIT_BUCKETS = 10000


@dataclass(frozen=True)
class DomainColumn:
    column: str
    order: tuple[str, ...] | None = None
    feature: bool = True
    max_domains: int = 1000
    min_rows: int = 1
    policy: DomainPolicy = DomainPolicy.ERROR
    other: str = "other"


@dataclass(frozen=True)
class CategoricalColumn:
    name: str
    column: str
    dim: int
    min_count: int = 1
    missing: MissingPolicy = MissingPolicy.OWN
    hash_buckets: int = 0
    hash_seed: int = 0
    max_size: int = 0  # > 0: the vocabulary keeps the max_size most frequent values (ties by value)
    multi: bool = False
    delimiter: str = "|"
    max_len: int = 16
    pooling: Pooling = Pooling.MEAN
    pretrained: str | None = None


@dataclass(frozen=True)
class NumericColumn:
    name: str
    column: str
    transform: Transform = Transform.NONE
    fill: float = 0.0
    indicator: bool = False


@dataclass(frozen=True)
class SplitSpec:
    kind: SplitKind = SplitKind.RANDOM
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    seed: int = SPLIT_SEED
    column: str | None = None
    values: tuple[str, str, str] = ("train", "val", "test")
    cuts: tuple[float, float] | None = None
    last: tuple[str, str] | None = None  # kind partition: the last value of train, of val


@dataclass(frozen=True)
class TableSchema:
    """What every column of a click log is (see the module docstring for the TOML form)."""

    domain: DomainColumn
    label: str | None = None
    label_threshold: float | None = None
    key: str | None = None
    categorical: tuple[CategoricalColumn, ...] = ()
    numeric: tuple[NumericColumn, ...] = ()
    split: SplitSpec = field(default_factory=SplitSpec)
    # The default embedding dim (every field without its own; the domain field's).
    dim: int = 8
    # Where the schema came from (for messages, and the base of relative pretrained paths).
    source: str = "<schema>"

    def __post_init__(self) -> None:
        names = [c.name for c in self.categorical] + [n.name for n in self.numeric]
        names += [f"{n.name}_missing" for n in self.numeric if n.indicator]
        if self.domain.feature:
            names.append(DOMAIN_FIELD)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"{self.source}: field name {name!r} used twice (the domain field is "
                                 f"{DOMAIN_FIELD!r} when domain.feature is true)")
            seen.add(name)
        if not self.categorical and not self.domain.feature:
            raise ValueError(f"{self.source}: no categorical field (add [categorical.NAME] or domain.feature = true)")
        self._check_label_is_no_input()
        self._check_sizes()
        f = self.split.fractions
        if self.split.kind is SplitKind.RANDOM and self.label is not None and min(f) <= 0:
            part = ("train", "val", "test")[min(range(3), key=lambda k: f[k])]
            raise ValueError(f"{self.source}: split.fractions = {list(f)} leaves the {part} split empty; every "
                             "split needs rows (validation: early stopping; test: the metrics)")

    def _check_label_is_no_input(self) -> None:
        """The label column may not also be read as an input: the model would see the answer."""
        if self.label is None:
            return
        uses = [f"[categorical.{c.name}]" for c in self.categorical if c.column == self.label]
        uses += [f"[numeric.{n.name}]" for n in self.numeric if n.column == self.label]
        if self.domain.column == self.label:
            uses.append("[domain]")
        if self.split.column == self.label:
            uses.append("[split]")
        if uses:
            raise ValueError(f"{self.source}: the label column {self.label!r} is also read by {', '.join(uses)}: "
                             "the label would leak into the model's input (or split the rows by the answer)")

    def _check_sizes(self) -> None:
        """The size knobs' upper bounds (module constants), with the memory a value would need."""
        if self.dim > MAX_DIM:
            raise ValueError(f"{self.source}: key 'dim' = {self.dim} is over the limit of {MAX_DIM} "
                             f"(each table row would need {human_bytes(4 * self.dim)})")
        for c in self.categorical:
            where = f"{self.source}: key 'categorical.{c.name}"
            if c.dim > MAX_DIM:
                raise ValueError(f"{where}.dim' = {c.dim} is over the limit of {MAX_DIM} "
                                 f"(each table row would need {human_bytes(4 * c.dim)})")
            if c.max_len > MAX_BAG:
                raise ValueError(f"{where}.max_len' = {c.max_len} is over the limit of {MAX_BAG}: reading would "
                                 f"need {human_bytes(4 * c.max_len)} per row ({human_bytes(4e6 * c.max_len)} per "
                                 "million rows)")
            if c.hash_buckets:
                need = table_bytes(RESERVED + c.hash_buckets, c.dim)
                if c.hash_buckets > MAX_HASH_BUCKETS or need > MAX_TABLE_BYTES:
                    raise ValueError(
                        f"{where}.hash_buckets' = {c.hash_buckets} would need {human_bytes(need)} for its float32 "
                        f"table ((3 + hash_buckets) x dim {c.dim} x 4 bytes, before optimizer state); the limits are "
                        f"{MAX_HASH_BUCKETS} buckets and {human_bytes(MAX_TABLE_BYTES)} per table")

    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent if self.source != "<schema>" else Path.cwd()

    def columns(self) -> list[str]:
        """The input columns the schema reads, each once, in a fixed order."""
        cols = [self.domain.column]
        if self.label is not None:
            cols.append(self.label)
        if self.key is not None:
            cols.append(self.key)
        cols += [c.column for c in self.categorical] + [n.column for n in self.numeric]
        if self.split.column is not None:
            cols.append(self.split.column)
        return list(dict.fromkeys(cols))

    def to_dict(self) -> dict[str, Any]:
        """The schema as plain JSON / TOML values (the inverse of :meth:`from_dict`)."""
        d = self.domain
        out: dict[str, Any] = {
            "domain": {"column": d.column, "feature": d.feature, "max_domains": d.max_domains,
                       "min_rows": d.min_rows, "policy": d.policy.value, "other": d.other},
            "categorical": {
                c.name: {"column": c.column, "dim": c.dim, "min_count": c.min_count, "missing": c.missing.value,
                         "hash_buckets": c.hash_buckets, "hash_seed": c.hash_seed, "multi": c.multi,
                         "delimiter": c.delimiter, "max_len": c.max_len, "pooling": c.pooling.value,
                         **({"pretrained": c.pretrained} if c.pretrained is not None else {}),
                         # Only when set: vocabularies written before max_size existed still match.
                         **({"max_size": c.max_size} if c.max_size else {})}
                for c in self.categorical
            },
            "numeric": {n.name: {"column": n.column, "transform": n.transform.value, "fill": n.fill,
                                 "indicator": n.indicator} for n in self.numeric},
            "split": {"kind": self.split.kind.value, "fractions": list(self.split.fractions),
                      "seed": self.split.seed, "values": list(self.split.values)},
            "dim": self.dim,
        }
        if d.order is not None:
            out["domain"]["order"] = list(d.order)
        if self.split.column is not None:
            out["split"]["column"] = self.split.column
        if self.split.cuts is not None:
            out["split"]["cuts"] = list(self.split.cuts)
        if self.split.last is not None:
            out["split"]["last"] = list(self.split.last)
        for key in ("label", "label_threshold", "key"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<schema>") -> TableSchema:
        """Build and check a schema from its TOML structure; ``ValueError`` naming ``source`` and the key."""
        r = _Reader(raw, source, "")
        label = r.opt("label", str)
        threshold = r.opt("label_threshold", float)
        key = r.opt("key", str)
        dim = r.get("dim", int, 8, lo=1)
        domain_raw = r.table("domain", required=True)
        dr = _Reader(domain_raw, source, "domain")
        order = dr.opt("order", list)
        domain = DomainColumn(
            column=dr.get("column", str, None, required=True),
            order=None if order is None else tuple(_str_item(source, "domain.order", v) for v in order),
            feature=dr.get("feature", bool, True),
            max_domains=dr.get("max_domains", int, 1000, lo=1),
            min_rows=dr.get("min_rows", int, 1, lo=0),
            policy=dr.enum("policy", DomainPolicy, DomainPolicy.ERROR),
            other=dr.get("other", str, "other"),
        )
        dr.done()
        if domain.order is not None and len(set(domain.order)) != len(domain.order):
            raise ValueError(f"{source}: domain.order lists a value twice: {list(domain.order)}")
        categorical = []
        for name, sub in r.table("categorical").items():
            cr = _Reader(_need_table(source, f"categorical.{name}", sub), source, f"categorical.{name}")
            multi = cr.get("multi", bool, False)
            spec = CategoricalColumn(
                name=name,
                column=cr.get("column", str, name),
                dim=cr.get("dim", int, dim, lo=1),
                min_count=cr.get("min_count", int, 1, lo=1),
                missing=cr.enum("missing", MissingPolicy, MissingPolicy.OWN),
                hash_buckets=cr.get("hash_buckets", int, 0, lo=0),
                hash_seed=cr.get("hash_seed", int, 0, lo=0, hi=2**64 - 1),
                max_size=cr.get("max_size", int, 0, lo=0),
                multi=multi,
                delimiter=cr.get("delimiter", str, "|"),
                max_len=cr.get("max_len", int, 16, lo=1),
                pooling=cr.enum("pooling", Pooling, Pooling.MEAN),
                pretrained=cr.opt("pretrained", str),
            )
            cr.done()
            if spec.multi and spec.pooling is Pooling.NONE:
                raise ValueError(f"{source}: categorical.{name}.pooling must be sum or mean for a multi-valued field")
            if not spec.delimiter:
                raise ValueError(f"{source}: categorical.{name}.delimiter must not be empty")
            if spec.pretrained is not None and spec.hash_buckets:
                raise ValueError(f"{source}: categorical.{name}: pretrained vectors need a vocabulary, "
                                 "not hash_buckets (hashed values cannot be looked up by raw value)")
            categorical.append(spec)
        numeric = []
        for name, sub in r.table("numeric").items():
            nr = _Reader(_need_table(source, f"numeric.{name}", sub), source, f"numeric.{name}")
            numeric.append(NumericColumn(
                name=name,
                column=nr.get("column", str, name),
                transform=nr.enum("transform", Transform, Transform.NONE),
                fill=nr.get("fill", float, 0.0),
                indicator=nr.get("indicator", bool, False),
            ))
            nr.done()
        sr = _Reader(r.table("split"), source, "split")
        kind = sr.enum("kind", SplitKind, SplitKind.RANDOM)
        fractions = sr.get("fractions", list, list(DEFAULT_FRACTIONS))
        values = sr.get("values", list, ["train", "val", "test"])
        cuts = sr.opt("cuts", list)
        last = sr.opt("last", list)
        split = SplitSpec(
            kind=kind,
            fractions=_triple(source, "split.fractions", fractions, float),
            seed=sr.get("seed", int, SPLIT_SEED, lo=0),
            column=sr.opt("column", str),
            values=_triple(source, "split.values", values, str),
            cuts=None if cuts is None else _pair(source, "split.cuts", cuts),
            last=None if last is None else _text_pair(source, "split.last", last),
        )
        sr.done()
        if any(f < 0 for f in split.fractions) or abs(sum(split.fractions) - 1.0) > 1e-9:
            raise ValueError(f"{source}: split.fractions must be three non-negative shares summing to 1, "
                             f"got {list(split.fractions)}")
        if kind in (SplitKind.COLUMN, SplitKind.TIME, SplitKind.PARTITION) and split.column is None:
            raise ValueError(f"{source}: split.kind = {kind.value!r} needs split.column")
        if kind is SplitKind.PARTITION and split.last is None:
            raise ValueError(f"{source}: split.kind = 'partition' needs split.last = [last train value, "
                             "last validation value]")
        if kind is SplitKind.HASH and key is None:
            raise ValueError(f"{source}: split.kind = 'hash' needs the top-level key (the column whose stable "
                             "hash picks each row's split)")
        if kind is SplitKind.HASH and split.column is not None:
            raise ValueError(f"{source}: split.column does not apply to kind 'hash' (it hashes the top-level key)")
        if kind is SplitKind.TIME and split.cuts is None:
            raise ValueError(f"{source}: split.kind = 'time' needs split.cuts = [val_start, test_start]")
        if kind is SplitKind.RANDOM and split.column is not None:
            raise ValueError(f"{source}: split.column applies to kind 'column' or 'time', not 'random'")
        r.done()
        return cls(domain=domain, label=label, label_threshold=threshold, key=key,
                   categorical=tuple(categorical), numeric=tuple(numeric), split=split, dim=dim, source=source)


def load_schema(path: str | os.PathLike[str] | TableSchema | Mapping[str, Any]) -> TableSchema:
    """A :class:`TableSchema` from a TOML file, a dict of the same shape, or one already built."""
    if isinstance(path, TableSchema):
        return path
    if isinstance(path, Mapping):
        return TableSchema.from_dict(path)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"schema file {str(p)!r} does not exist")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not a valid TOML file: {exc}") from None
    return TableSchema.from_dict(raw, source=str(p))


# ----------------------------------------------------------------------------------------------


def _need_table(source: str, where: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: [{where}] must be a table, got {value!r}")
    return value


def _str_item(source: str, where: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{source}: {where} must hold strings, got {value!r}")
    return str(value)


def _triple(source: str, where: str, value: list[Any], kind: type) -> tuple[Any, Any, Any]:
    if len(value) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else kind)
                              for v in value):
        raise ValueError(f"{source}: {where} must be three {kind.__name__} values, got {value!r}")
    return tuple(kind(v) for v in value)


def _text_pair(source: str, where: str, value: list[Any]) -> tuple[str, str]:
    if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, str | int) for v in value) \
            or str(value[0]) > str(value[1]):
        raise ValueError(f"{source}: {where} must be two values in increasing text order "
                         f"[last train value, last validation value], got {value!r}")
    return str(value[0]), str(value[1])


def _pair(source: str, where: str, value: list[Any]) -> tuple[float, float]:
    if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                              for v in value) or value[0] > value[1]:
        raise ValueError(f"{source}: {where} must be two increasing numbers [val_start, test_start], got {value!r}")
    return float(value[0]), float(value[1])


class _Reader:
    """Reads keys of one TOML table, checking types; :meth:`done` refuses the keys left over."""

    def __init__(self, raw: Mapping[str, Any], source: str, where: str) -> None:
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: [{where}] must be a table")
        self.raw, self.source, self.where = raw, source, where
        self.used: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, default: Any, *, required: bool = False,
            lo: int | None = None, hi: int | None = None) -> Any:
        self.used.add(key)
        if key not in self.raw:
            if required:
                raise ValueError(f"{self.source}: missing key {self._name(key)!r}")
            return default
        value = self.raw[key]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ValueError(f"{self.source}: key {self._name(key)!r} must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{self.source}: key {self._name(key)!r} must be finite, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{self.source}: key {self._name(key)!r} must be in [{lo}, {hi if hi is not None else 'inf'}], "
                             f"got {value!r}")
        return value

    def opt(self, key: str, kind: type) -> Any:
        return self.get(key, kind, None)

    def enum(self, key: str, kind: type[enum.Enum], default: enum.Enum) -> Any:
        value = self.get(key, str, default.value)
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{self.source}: key {self._name(key)!r} must be one of "
                             f"{[k.value for k in kind]}, got {value!r}") from None

    def table(self, key: str, *, required: bool = False) -> Mapping[str, Any]:
        self.used.add(key)
        if key not in self.raw:
            if required:
                raise ValueError(f"{self.source}: missing table [{self._name(key)}]")
            return {}
        return _need_table(self.source, self._name(key), self.raw[key])

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ValueError(f"{self.source}: unknown schema key {self._name(unknown[0])!r} "
                             f"(known in {'[' + self.where + ']' if self.where else 'the top level'}: {sorted(self.used)})")
