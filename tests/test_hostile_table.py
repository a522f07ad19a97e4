"""Hostile input to the table source (issue 29): one test per class of bad input, each a case
that once loaded silently wrong or ended in a traceback. Written against ``moefast.data.load``
and the command line only, so they hold whichever reading code serves them.

Each refusal is one ``ValueError`` whose message names the file and, where there is one, the row
and the column (docs/reliability.md, "Bad input to the table source").
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moefast

SCHEMA: dict[str, Any] = {
    "label": "click",
    "dim": 4,
    "domain": {"column": "site"},
    "categorical": {"user": {}},
    "numeric": {"dwell": {"transform": "standardise"}},
}


def _rows(n: int = 300, seed: int = 0) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    return {
        "site": [("a", "b")[i % 2] for i in range(n)],
        "user": [f"u{v}" for v in rng.integers(0, 20, n)],
        "dwell": [f"{v:.2f}" for v in rng.uniform(0, 100, n)],
        "click": [str(v) for v in rng.integers(0, 2, n)],
    }


def _csv(path: Path, rows: dict[str, list[str]], header: list[str] | None = None) -> Path:
    names = header or list(rows)
    lines = [",".join(names)] + [",".join(vals) for vals in zip(*rows.values(), strict=True)]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _load(path: Path, schema: Any = None, **kw: Any) -> moefast.data.MultiDomainDataset:
    return moefast.data.load("table", path=path, schema=schema or SCHEMA, use_cache=False, progress=False, **kw)


def _refused(path: Path, pattern: str, schema: Any = None, **kw: Any) -> str:
    with pytest.raises(ValueError, match=pattern) as info:
        _load(path, schema, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_numeric_statistics_cannot_overflow(tmp_path: Path) -> None:
    """Ten rows of 1e160 in 300: the population std once overflowed to inf, every standardised
    value became -0.0, and vocab.json recorded ``"std": Infinity``."""
    rows = _rows()
    for i in range(0, 300, 30):
        rows["dwell"][i] = "1e160"
    ds = _load(_csv(tmp_path / "log.csv", rows))
    stats = ds.info["table"]["numeric"]["dwell"]
    assert np.isfinite(stats["mean"]) and np.isfinite(stats["std"]) and stats["std"] > 1e158
    values = ds.train.features["dwell"].numpy()
    assert np.isfinite(values).all() and len(set(values.tolist())) > 1  # the outliers stand apart
    run = tmp_path / "run"
    moefast.data.table.save_vocab(ds, run)
    json.loads((run / "vocab.json").read_text(), parse_constant=lambda c: pytest.fail(f"vocab.json holds {c}"))
    # The same statistics apply unchanged to scoring data (any split the value lands in).
    again = _load(tmp_path / "log.csv", vocab_from=run)
    assert again.info["table"]["numeric"] == ds.info["table"]["numeric"]

    # A finite value beyond float32 is located at its row, in whichever split it lands.
    rows = _rows()
    rows["dwell"][123] = "1e300"
    _refused(_csv(tmp_path / "big.csv", rows), r"big\.csv, row 124, column 'dwell': value .* overflows float32",
             {**SCHEMA, "numeric": {"dwell": {"transform": "none"}}})
    # A vocabulary holding a non-finite statistic (written by an older moefast) is refused.
    bad = json.loads((run / "vocab.json").read_text())
    bad["numeric"]["dwell"]["std"] = float("inf")
    (run / "vocab.json").write_text(json.dumps(bad))
    _refused(tmp_path / "log.csv", r"vocab\.json' is damaged: Infinity is not a JSON value", vocab_from=run)


def test_a_header_naming_a_read_column_twice_is_refused(tmp_path: Path) -> None:
    rows = _rows()
    rows["extra"] = rows["user"]
    path = _csv(tmp_path / "log.csv", rows, header=["site", "user", "dwell", "click", "user"])
    _refused(path, r"log\.csv, column 'user': named 2 times in the header")
    table = pa.table([pa.array(v) for v in rows.values()], names=["site", "user", "dwell", "click", "user"])
    pq.write_table(table, tmp_path / "log.parquet")
    _refused(tmp_path / "log.parquet", r"log\.parquet, column 'user': named 2 times in the header")


@pytest.mark.parametrize("reader", ["numeric", "categorical", "domain"])
def test_the_label_read_as_an_input_is_refused(tmp_path: Path, reader: str) -> None:
    """``label = "click"`` plus ``[numeric.click]``: the label leaked into the model's input."""
    schema: dict[str, Any] = {**SCHEMA}
    if reader == "domain":
        schema["domain"] = {"column": "click"}
    else:
        schema[reader] = {**SCHEMA.get(reader, {}), "leak": {"column": "click"}}
    source = tmp_path / "schema.toml"
    from moefast.data.schema import TableSchema

    with pytest.raises(ValueError, match=r"schema\.toml: the label column 'click' is also read by \[" + reader):
        TableSchema.from_dict(schema, source=str(source))


def test_a_partition_key_named_twice_after_decoding_is_refused(tmp_path: Path) -> None:
    """``site=a/s%69te=b/``: the raw folder names differ, the decoded keys do not."""
    rows = _rows()
    del rows["site"]
    root = tmp_path / "log"
    (root / "site=a" / "s%69te=b").mkdir(parents=True)
    _csv(root / "site=a" / "s%69te=b" / "part-0.csv", rows)
    _refused(root, r"'site=a/s%69te=b' names the partition key 'site' twice \('s%69te' decodes to 'site'\)")


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_partition_value_that_is_not_utf8_once_decoded_is_located(tmp_path: Path, kind: str) -> None:
    """``site=%FF``: pyarrow.dataset's Hive parsing (both formats) refuses it, naming the folder;
    before, it was read as U+FFFD, one value for every such folder."""
    rows = _rows()
    del rows["site"]
    folder = tmp_path / "log" / "site=%FF"
    folder.mkdir(parents=True)
    if kind == "csv":
        _csv(folder / "part-0.csv", rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(rows), folder / "part-0.parquet")
    _refused(tmp_path / "log", r"site=%FF: a partition folder's name cannot be read \(.*not valid UTF-8")


def test_a_split_with_an_empty_part_is_refused(tmp_path: Path) -> None:
    """``fractions = [1, 0, 0]`` trained unchecked and reported null for every metric."""
    from moefast.data.schema import TableSchema

    for fractions, part in (([1, 0, 0], "val"), ([0.5, 0.5, 0], "test"), ([0, 0.5, 0.5], "train")):
        with pytest.raises(ValueError, match=rf"split\.fractions = .* leaves the {part} split empty"):
            TableSchema.from_dict({**SCHEMA, "split": {"fractions": fractions}})
    rows = _rows()
    rows["ds"] = ["train" if i % 3 else "val" for i in range(300)]  # no test rows
    path = _csv(tmp_path / "log.csv", rows)
    _refused(path, r"log\.csv, column 'ds': the test split is empty \(split 'column': no row has the value 'test'\)",
             {**SCHEMA, "split": {"kind": "column", "column": "ds"}})
    rows["ds"] = [str(i) for i in range(300)]
    _refused(_csv(tmp_path / "time.csv", rows), r"time\.csv, column 'ds': the validation split is empty",
             {**SCHEMA, "split": {"kind": "time", "column": "ds", "cuts": [1000, 2000]}})


def test_an_unreadable_gzip_file_is_one_located_line(tmp_path: Path) -> None:
    """A truncated ``.csv.gz`` and a plain file named ``.gz`` ended in pyarrow's ``OSError``."""
    full = _csv(tmp_path / "full.csv.gz", _rows(20000)).read_bytes()
    (tmp_path / "cut.csv.gz").write_bytes(full[: len(full) // 2])
    _refused(tmp_path / "cut.csv.gz", r"cut\.csv\.gz: not a readable gzip file \(truncated, damaged, or not gzip\)")
    plain = _csv(tmp_path / "plain.csv", _rows())
    (tmp_path / "plain.csv.gz").write_bytes(plain.read_bytes())
    _refused(tmp_path / "plain.csv.gz", r"plain\.csv\.gz: not a readable gzip file")


@pytest.mark.parametrize(("key", "value", "need"), [
    ("hash_buckets", 10**15, r"would need 14\.2 PiB for its float32 table"),
    ("hash_buckets", 3 * 10**9, r"would need 44\.7 GiB .* the limits are 2147483644 buckets"),
    ("max_len", 10**12, r"over the limit of 1024: reading would need 3\.6 TiB per row"),
    ("dim", 10**7, r"over the limit of 4096 \(each table row would need 38\.1 MiB\)"),
])
def test_size_knobs_have_upper_bounds(tmp_path: Path, key: str, value: int, need: str) -> None:
    """``hash_buckets = 10**15`` and ``max_len = 10**12`` ended in allocator tracebacks."""
    path = _csv(tmp_path / "log.csv", _rows())
    extra = {"multi": True} if key == "max_len" else {}
    schema = {**SCHEMA, "categorical": {"user": {key: value, **extra}}}
    _refused(path, rf"key 'categorical\.user\.{key}' .*{need}", schema)


def test_bytes_that_are_not_utf8_are_located(tmp_path: Path) -> None:
    """A latin-1 byte near the top gave ``'utf-8' codec can't decode byte 0xe9 in position 375``."""
    rows = _rows()
    rows["user"][2] = "caf\xe9"
    names = list(rows)
    lines = [",".join(names)] + [",".join(vals) for vals in zip(*rows.values(), strict=True)]
    (tmp_path / "log.csv").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    _refused(tmp_path / "log.csv", r"log\.csv, row 3, column 'user': not UTF-8 text: byte 0xe9")
    (tmp_path / "gz.csv.gz").write_bytes(gzip.compress((tmp_path / "log.csv").read_bytes()))
    _refused(tmp_path / "gz.csv.gz", r"gz\.csv\.gz, row 3, column 'user': not UTF-8 text")
    (tmp_path / "head.csv").write_bytes("s\xefte,user,dwell,click\na,u,1,0\n".encode("latin-1"))
    _refused(tmp_path / "head.csv", r"head\.csv: the header is not UTF-8 text: byte 0xef at byte 2")


@pytest.mark.parametrize(("value", "problem"), [
    (float("nan"), r"id nan is not a number"),
    (2.0**53 + 2, r"float id 9007199254740994 is above 2\^53"),
    (1e20, r"float id 1e\+20 is above 2\^53"),
])
def test_a_float_id_column_that_cannot_name_an_id_is_located(tmp_path: Path, value: float, problem: str) -> None:
    """A Parquet float64 id column with a NaN or a whole number above 2^53 gave ``Integer value
    ... not in range`` (or merged neighbouring ids silently)."""
    rows = _rows()
    users = [float(i % 7) for i in range(300)]
    users[41] = value
    table = pa.table({"site": rows["site"], "user": pa.array(users, pa.float64()),
                      "dwell": pa.array([float(v) for v in rows["dwell"]]), "click": rows["click"]})
    pq.write_table(table, tmp_path / "log.parquet")
    _refused(tmp_path / "log.parquet", rf"log\.parquet, row 42, column 'user': {problem}")


def test_labels_are_0_or_1_as_written(tmp_path: Path) -> None:
    """``" 1 "``, ``+1``, ``1e0`` and ``1.0`` were all read as 1, and NaN was "an empty label"."""
    for text in (" 1 ", "+1", "1e0", "1.0"):
        rows = _rows()
        rows["click"][7] = text
        path = _csv(tmp_path / "log.csv", rows)
        _refused(path, rf"log\.csv, row 8, column 'click': label {text!r} is not written 0 or 1".replace("+", r"\+"))
        ds = _load(path, {**SCHEMA, "label_threshold": 0.5})  # as numbers, the documented way
        assert len(ds.train) + len(ds.val) + len(ds.test) == 300
    rows = _rows()
    rows["click"][7] = "NaN"
    _refused(_csv(tmp_path / "nan.csv", rows), r"row 8, column 'click': label 'NaN' is NaN")
    table = pa.table({**{k: v for k, v in rows.items() if k != "click"},
                      "click": pa.array([float("nan") if i == 7 else float(i % 2) for i in range(300)])})
    pq.write_table(table, tmp_path / "nan.parquet")
    _refused(tmp_path / "nan.parquet", r"row 8, column 'click': label nan is not a finite number")


def test_whitespace_around_categorical_ids_is_not_part_of_the_id(tmp_path: Path) -> None:
    """``" u5"`` and ``"u5"`` became two ids (numeric fields were already trimmed)."""
    rows = _rows()
    plain = _load(_csv(tmp_path / "plain.csv", rows))
    padded = {**rows, "user": [f" {u}\t" if i % 3 == 0 else u for i, u in enumerate(rows["user"])],
              "site": [f"{s} " if i % 5 == 0 else s for i, s in enumerate(rows["site"])]}
    ds = _load(_csv(tmp_path / "padded.csv", padded))
    assert ds.info["table"]["categorical"]["user"]["values"] == plain.info["table"]["categorical"]["user"]["values"]
    assert ds.domain_names == plain.domain_names == ("a", "b")
    for split in ("train", "val", "test"):
        assert (getattr(ds, split).features["user"] == getattr(plain, split).features["user"]).all()
    blank = {**rows, "user": ["  " if i == 4 else u for i, u in enumerate(rows["user"])]}
    ids = _load(_csv(tmp_path / "blank.csv", blank), {**SCHEMA, "split": {"fractions": [0.98, 0.01, 0.01]}})
    from moefast.data.vocab import MISSING_ID

    assert (ids.train.features["user"] == MISSING_ID).sum() == 1  # whitespace only: missing
