"""Small Hive-partitioned Parquet click logs for the streamed-source tests (issue 26)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DAYS = ("2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01")


def stream_schema(split: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "label": "click",
        "key": "rid",
        "dim": 4,
        "domain": {"column": "site"},
        "categorical": {
            "user": {"min_count": 2},
            "item": {"missing": "oov", "max_size": 12},
            "tags": {"multi": True, "max_len": 3},
            "city": {"hash_buckets": 16, "hash_seed": 5},
        },
        "numeric": {
            "price": {"transform": "log1p-standardise", "indicator": True},
            "age": {"transform": "none"},
        },
        "split": split or {"kind": "hash", "fractions": [0.6, 0.2, 0.2], "seed": 7},
    }
    schema.update(extra)
    return schema


def frame(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    item = [f"i{v}" for v in rng.integers(0, 40, n)]
    item[3] = None  # type: ignore[call-overload]
    price = np.round(np.exp(rng.normal(2, 1, n)), 3).tolist()
    for i in rng.choice(n, max(n // 40, 1), replace=False):
        price[i] = None
    return pa.table({
        "rid": [f"r{i}" for i in range(n)],
        "site": rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2]).tolist(),
        "dt": [DAYS[k] for k in rng.integers(0, len(DAYS), n)],
        "user": [f"u{v}" for v in rng.zipf(1.5, n) % 60],
        "item": item,
        "tags": ["|".join(f"t{t}" for t in rng.integers(0, 9, rng.integers(0, 5))) for _ in range(n)],
        "city": rng.choice(["paris", "oslo", "lima", "kyiv"], n).tolist(),
        "price": pa.array(price, pa.float64()),
        "age": pa.array(rng.integers(18, 80, n).astype(np.float64)),
        "click": pa.array(rng.integers(0, 2, n).astype(np.int64)),
    })


def write_log(folder: Path, n: int = 1200, seed: int = 0, *, by: tuple[str, ...] = ("site", "dt"),
              row_group: int = 50) -> Path:
    """``folder`` as a Hive-partitioned log (``site=a/dt=.../part-0.parquet``), row groups of
    ``row_group`` rows; rows keep their order inside each file."""
    tab = frame(n, seed)
    keys = [tab[c].to_pylist() for c in by]
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, k in enumerate(zip(*keys, strict=True)):
        groups.setdefault(tuple(k), []).append(i)
    rest = tab.drop_columns(list(by))
    for k, rows in sorted(groups.items()):
        sub = folder.joinpath(*[f"{c}={v}" for c, v in zip(by, k, strict=True)])
        sub.mkdir(parents=True, exist_ok=True)
        pq.write_table(rest.take(pa.array(rows)), sub / "part-0.parquet", row_group_size=row_group)
    return folder


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def write_schema(path: Path, schema: dict[str, Any]) -> Path:
    """``schema`` (a dict of scalars and tables up to two levels deep) as a TOML file."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in schema.items() if not isinstance(v, dict)]
    for k, v in schema.items():
        if not isinstance(v, dict):
            continue
        flat = {a: b for a, b in v.items() if not isinstance(b, dict)}
        if flat or not v:
            lines.append(f"[{k}]")
            lines += [f"{a} = {_toml_value(b)}" for a, b in flat.items()]
        for a, b in v.items():
            if isinstance(b, dict):
                lines.append(f"[{k}.{a}]")
                lines += [f"{x} = {_toml_value(y)}" for x, y in b.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
