"""Loading a 26-field click log with the tabular source, CSV and Parquet, vs pandas.

Workload, generated at bench time into a temporary folder (never committed; free disk checked
first): ``MOEFAST_BENCH_TABLE_ROWS`` rows (default 1,000,000) of a label, a domain (10 string
values) and 26 fields: 22 single-valued categorical fields whose ids are **integer text**
(``"48213"``; Zipf over vocabularies log-spaced from 10 to 1,000,000) and 4 numeric fields
(floats with 3 decimals, 1% missing). The same table is written as an uncompressed CSV (pyarrow's
writer) and as one Parquet file (snappy, row groups of 128k rows).

Providers, each one whole load in the same process:

- ``moefast-csv`` / ``moefast-parquet``: ``moefast.data.load("table", ...)``: chunked pyarrow
  read, vocabularies counted on the training split (min count 1), numeric standardised with
  training statistics, the per-domain stratified split, final int64 / float32 tensors
  (``use_cache=False``: the work itself, not a cache hit).
- ``pandas-csv``: the peer the issue names: ``pandas.read_csv`` (C engine, the categorical
  columns as strings, like the ids' text) then ``pandas.factorize`` on every categorical column
  and the domain: ids over the whole file, no split, no vocabulary file.

``extra_info["rows_per_second"]`` is the throughput. Run:
``MOEFAST_BENCH_TABLE_ROWS=10000000 python -m pytest bench/test_bench_table.py --benchmark-only``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROWS = int(os.environ.get("MOEFAST_BENCH_TABLE_ROWS", "1000000"))
CATEGORICAL = 22
NUMERIC = 4
# Bytes a row takes in the CSV (measured: about 135), with room for the Parquet file.
BYTES_PER_ROW = 220


def _schema() -> dict[str, Any]:
    return {
        "label": "click",
        "dim": 16,
        "domain": {"column": "domain"},
        "categorical": {f"c{j:02d}": {} for j in range(CATEGORICAL)},
        "numeric": {f"n{j}": {"transform": "standardise"} for j in range(NUMERIC)},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("table-bench")
    free = shutil.disk_usage(folder).free
    if free < ROWS * BYTES_PER_ROW * 2:
        pytest.skip(f"needs about {ROWS * BYTES_PER_ROW * 2 / 2**30:.1f} GiB free in {folder}, has {free / 2**30:.1f}")
    rng = np.random.default_rng(0)
    vocabs = np.geomspace(10, 1_000_000, CATEGORICAL).round().astype(np.int64)
    columns: dict[str, Any] = {
        "click": pa.array((rng.random(ROWS) < 0.2).astype(np.int8)),
        "domain": pa.array(np.array([f"d{k}" for k in range(10)])[rng.integers(0, 10, ROWS)]),
    }
    for j, vocab in enumerate(vocabs):
        ids = np.minimum(rng.zipf(1.2, ROWS), vocab) - 1
        columns[f"c{j:02d}"] = pa.array(ids).cast(pa.string())
    for j in range(NUMERIC):
        values = np.round(rng.lognormal(1.0, 1.0, ROWS), 3)
        columns[f"n{j}"] = pa.array(values, mask=rng.random(ROWS) < 0.01)
    table = pa.table(columns)
    out = {"csv": folder / "clicks.csv", "parquet": folder / "clicks.parquet"}
    pacsv.write_csv(table, out["csv"])
    pq.write_table(table, out["parquet"], row_group_size=131_072)
    return out


def _moefast(path: Path) -> int:
    import moefast

    ds = moefast.data.load("table", path=path, schema=_schema(), use_cache=False, progress=False)
    return len(ds.train) + len(ds.val) + len(ds.test)


def _pandas(path: Path) -> int:
    import pandas as pd

    cats = [f"c{j:02d}" for j in range(CATEGORICAL)]
    frame = pd.read_csv(path, dtype={c: str for c in [*cats, "domain"]}, engine="c")
    for col in [*cats, "domain"]:
        frame[col] = pd.factorize(frame[col])[0]
    return len(frame)


@pytest.mark.parametrize("provider", ["moefast-csv", "moefast-parquet", "pandas-csv"])
def test_load(benchmark: Any, files: dict[str, Path], provider: str) -> None:
    run = {
        "moefast-csv": lambda: _moefast(files["csv"]),
        "moefast-parquet": lambda: _moefast(files["parquet"]),
        "pandas-csv": lambda: _pandas(files["csv"]),
    }[provider]
    benchmark.group = f"table-load-{ROWS}-rows"
    rows = benchmark.pedantic(run, rounds=3 if ROWS <= 1_000_000 else 1, warmup_rounds=0)
    assert rows == ROWS
    benchmark.extra_info["rows"] = ROWS
    benchmark.extra_info["fields"] = {"categorical": CATEGORICAL, "numeric": NUMERIC, "ids": "integer text"}
    benchmark.extra_info["file_bytes"] = {k: v.stat().st_size for k, v in files.items()}
    benchmark.extra_info["rows_per_second"] = ROWS / benchmark.stats.stats.median
