"""The streamed first pass (issue 26): counts merged across batches and files, thresholds,
max_size, hashing, splits that need no full read, the ids equal the in-memory source's, the
recorded fingerprint of the file list, the command `moefast vocab`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _stream_data import stream_schema, write_log, write_schema

import moefast
from moefast.data import firstpass
from moefast.data.schema import TableSchema
from moefast.data.table import TableError


def _memory(path: Path, schema: dict[str, object]) -> dict[str, object]:
    ds = moefast.data.load("table", path=path, schema=schema, use_cache=False, progress=False)
    return dict(ds.info["table"])  # type: ignore[arg-type]


SPLITS = [
    {"kind": "hash", "fractions": [0.6, 0.2, 0.2], "seed": 7},
    {"kind": "partition", "column": "dt", "last": ["2026-11-29", "2026-11-30"]},
    {"kind": "time", "column": "age", "cuts": [50, 65]},
]


@pytest.mark.parametrize("split", SPLITS, ids=[s["kind"] for s in SPLITS])
def test_the_first_pass_equals_the_in_memory_vocabularies(tmp_path: Path, split: dict[str, object]) -> None:
    log = write_log(tmp_path / "log")
    schema = stream_schema(split)
    mem = _memory(log, schema)
    # Batches of 7 rows: every field's counts merge across many batches and 12 files.
    firstpass.COMPACT_ROWS, old = 16, firstpass.COMPACT_ROWS
    try:
        art = firstpass.first_pass(log, schema, batch_rows=7, progress=False)
    finally:
        firstpass.COMPACT_ROWS = old
    assert art["domains"] == mem["domains"]
    for name, field in mem["categorical"].items():  # type: ignore[union-attr]
        mine = art["categorical"][name]
        for key in ("values", "counts", "vocab_size", "hash", "missing_id"):
            assert mine.get(key) == field.get(key), (name, key)
    for name, stats in mem["numeric"].items():  # type: ignore[union-attr]
        for key in ("mean", "std"):
            assert art["numeric"][name][key] == pytest.approx(stats[key], rel=1e-12, abs=1e-12), (name, key)
    assert art["schema"] == mem["schema"]
    assert len(art["stream"]["files"]) == 12 and sum(f["rows"] for f in art["stream"]["files"]) == 1200
    assert sum(art["stream"]["rows"].values()) == 1200


def test_thresholds_max_size_and_hash_buckets(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log", n=600)
    art = firstpass.first_pass(log, stream_schema(), progress=False)
    user, item, city = (art["categorical"][k] for k in ("user", "item", "city"))
    assert min(user["counts"]) >= 2  # min_count
    assert len(item["values"]) == 12 and item["vocab_size"] == 15  # max_size: the top 12
    pairs = list(zip(item["counts"], item["values"], strict=True))
    assert pairs == sorted(pairs, key=lambda p: (-p[0], p[1]))  # count descending, ties by value
    assert city["values"] is None and city["vocab_size"] == 3 + 16 and city["hash"] == {"buckets": 16, "seed": 5}
    # max_size in the in-memory source too: the ids beyond the top 12 are OOV.
    ds = moefast.data.load("table", path=log, schema=stream_schema(), use_cache=False, progress=False)
    assert int(ds.train.features["item"].max()) == 14


def test_random_split_is_refused_naming_hash_and_csv_stays_in_memory(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log", n=200)
    with pytest.raises(ValueError, match="'hash'"):
        firstpass.first_pass(log, stream_schema({"kind": "random"}), progress=False)
    csv = tmp_path / "x.csv"
    csv.write_text("site,click,rid,user\na,1,r1,u\n")
    with pytest.raises(ValueError, match="reads Parquet"):
        firstpass.first_pass(csv, stream_schema(), progress=False)
    with pytest.raises(ValueError, match="needs the top-level key"):
        TableSchema.from_dict({k: v for k, v in stream_schema().items() if k != "key"})


def test_the_fingerprint_catches_a_file_added_deleted_or_truncated(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log", n=300)
    files, root = firstpass.stream_files(log, TableSchema.from_dict(stream_schema()))
    prints = firstpass.fingerprint(files, root)
    firstpass.check_fingerprint(prints, files, root, "vocab.json")
    extra = log / "site=a" / "dt=2026-11-28" / "part-1.parquet"
    pq.write_table(pa.table({"x": [1]}), extra)
    files2, _ = firstpass.stream_files(log, TableSchema.from_dict(stream_schema()))
    with pytest.raises(TableError, match=r"part-1\.parquet: added since the first pass"):
        firstpass.check_fingerprint(prints, files2, root, "vocab.json")
    extra.unlink()
    victim = files[3]
    victim.unlink()
    files3, _ = firstpass.stream_files(log, TableSchema.from_dict(stream_schema()))
    with pytest.raises(TableError, match="deleted since the first pass"):
        firstpass.check_fingerprint(prints, files3, root, "vocab.json")
    write_log(tmp_path / "log", n=300)  # rewrites every file (same content, new mtime)
    other = files[5]
    data = other.read_bytes()
    other.write_bytes(data[: len(data) // 2] + data[-8:])
    os.utime(other, ns=(prints[5]["mtime_ns"], prints[5]["mtime_ns"]))
    with pytest.raises(TableError, match=rf"{other.name}.*changed since the first pass"):
        firstpass.check_fingerprint(prints, files, root, "vocab.json")


def test_the_vocab_command_writes_what_train_reuses(tmp_path: Path) -> None:
    from moefast.cli import main

    log = write_log(tmp_path / "log", n=400)
    toml = write_schema(tmp_path / "schema.toml", stream_schema())
    out = tmp_path / "vocab.json"
    assert main(["vocab", "--data", str(log), "--schema", str(toml), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["format"] == "moefast-table-vocab" and "stream" in saved
    # The in-memory source reuses it (--vocab-from): the same ids.
    ds = moefast.data.load("table", path=log, schema=toml, vocab_from=out, use_cache=False, progress=False)
    assert list(ds.domain_names) == saved["domains"]["names"]
    assert np.array_equal(ds.feature("user").vocab_size, saved["categorical"]["user"]["vocab_size"])


DOMAINS = [
    {"column": "site", "min_rows": 300, "policy": "drop"},
    {"column": "site", "max_domains": 2, "policy": "other", "other": "rest"},
    {"column": "site", "order": ["c", "a", "b"]},
]


@pytest.mark.parametrize("domain", DOMAINS, ids=["drop", "other", "order"])
def test_the_domain_policies_equal_the_in_memory_ones(tmp_path: Path, domain: dict[str, object]) -> None:
    log = write_log(tmp_path / "log", n=1000)
    schema = stream_schema(domain=domain)
    mem = _memory(log, schema)
    art = firstpass.first_pass(log, schema, batch_rows=64, progress=False)
    assert art["domains"] == mem["domains"]
    assert art["categorical"]["user"]["values"] == mem["categorical"]["user"]["values"]  # type: ignore[index]
