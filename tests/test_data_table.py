"""The tabular source: formats, schema, vocabularies, hashing, numeric transforms, errors, reuse."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import moefast
from moefast.data import table as table_mod
from moefast.data import vocab as _vocab  # noqa: F401  (moefast.data.vocab below)
from moefast.data.schema import TableSchema, load_schema
from moefast.data.vocab import MISSING_ID, OOV_ID, RESERVED, read_vocab, stable_hash

SCHEMA = {
    "label": "click",
    "key": "rid",
    "dim": 4,
    "domain": {"column": "site"},
    "categorical": {
        "user": {"min_count": 2},
        "item": {"missing": "oov"},
        "tags": {"multi": True, "delimiter": "|", "max_len": 3},
        "city": {"hash_buckets": 16, "hash_seed": 5},
    },
    "numeric": {
        "price": {"transform": "log1p-standardise", "indicator": True, "fill": 0.5},
        "age": {"transform": "standardise"},
        "score": {"transform": "none", "fill": -1.0},
        "count": {"transform": "log1p"},
    },
}


def _frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    price = np.round(np.exp(rng.normal(2, 1, n)), 3)
    price_s = [f"{p}" for p in price]
    for i in rng.choice(n, 10, replace=False):
        price_s[i] = ""
    tags = ["|".join(f"t{t}" for t in rng.integers(0, 8, rng.integers(0, 6))) for _ in range(n)]
    item = [f"i{v}" for v in rng.integers(0, 30, n)]
    item[3] = ""
    return pd.DataFrame({
        "rid": [f"r{i}" for i in range(n)],
        "site": rng.choice(["a", "b", "c"], n),
        "user": [f"u{v}" for v in rng.zipf(1.5, n) % 50],
        "item": item,
        "tags": tags,
        "city": rng.choice(["paris", "oslo", "lima", "kyiv"], n),
        "price": price_s,
        "age": rng.integers(18, 80, n).astype(str),
        "score": np.round(rng.normal(0, 1, n), 4).astype(str),
        "count": rng.integers(0, 100, n).astype(str),
        "click": rng.integers(0, 2, n).astype(str),
    })


def _write_csv(frame: pd.DataFrame, path: Path, sep: str = ",") -> Path:
    text = frame.to_csv(index=False, sep=sep)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _write_parquet(frame: pd.DataFrame, path: Path, *, lists: bool = False, parts: int = 1) -> Path:
    out = {}
    for col in frame.columns:
        values = frame[col].tolist()
        if col in ("price", "age", "score", "count", "click"):
            out[col] = pa.array([None if v == "" else float(v) for v in values], pa.float64())
        elif col == "tags" and lists:
            out[col] = pa.array([[t for t in v.split("|") if t] if v else [] for v in values], pa.list_(pa.string()))
        else:
            out[col] = pa.array([None if v == "" else v for v in values], pa.string())
    tab = pa.table(out)
    if parts == 1:
        pq.write_table(tab, path, row_group_size=97)
        return path
    path.mkdir()
    step = -(-tab.num_rows // parts)
    for k in range(parts):
        pq.write_table(tab.slice(k * step, step), path / f"part-{k:05d}.parquet")
    (path / "_SUCCESS").write_text("")
    return path


def _load(path: Path, schema: object = None, **kw: object) -> moefast.data.MultiDomainDataset:
    return moefast.data.load("table", path=path, schema=schema or SCHEMA, use_cache=False, progress=False, **kw)


def _same(a: moefast.data.MultiDomainDataset, b: moefast.data.MultiDomainDataset) -> None:
    assert a.features == b.features and a.numeric == b.numeric and a.domain_names == b.domain_names
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert set(sa.features) == set(sb.features)
        for k in sa.features:
            assert sa.features[k].dtype == sb.features[k].dtype, k
            assert torch.equal(sa.features[k], sb.features[k]), (name, k)
        assert torch.equal(sa.domain, sb.domain) and torch.equal(sa.label, sb.label)
    ta, tb = dict(a.info["table"]), dict(b.info["table"])
    assert ta == tb


def test_csv_tsv_gzip_parquet_and_part_folders_give_identical_datasets(tmp_path: Path) -> None:
    frame = _frame()
    ref = _load(_write_csv(frame, tmp_path / "log.csv"))
    _same(ref, _load(_write_csv(frame, tmp_path / "log.tsv.gz", sep="\t")))
    _same(ref, _load(_write_parquet(frame, tmp_path / "log.parquet")))
    _same(ref, _load(_write_parquet(frame, tmp_path / "parts", lists=True, parts=3)))
    csv_parts = tmp_path / "csvparts"
    csv_parts.mkdir()
    for k, rows in enumerate(np.array_split(np.arange(len(frame)), 4)):
        _write_csv(frame.iloc[rows], csv_parts / f"part-{k:05d}.csv")
    (csv_parts / "_SUCCESS").write_text("")
    _same(ref, _load(csv_parts))
    # Small chunks: many CSV blocks and Parquet batches give the same dataset.
    mp = pytest.MonkeyPatch()
    mp.setattr(table_mod, "CSV_BLOCK_BYTES", 2048)
    mp.setattr(table_mod, "PARQUET_BATCH_ROWS", 33)
    try:
        _same(ref, _load(tmp_path / "log.csv"))
        _same(ref, _load(tmp_path / "log.parquet"))
    finally:
        mp.undo()


def test_ids_reserved_ids_min_count_missing_and_bags(tmp_path: Path) -> None:
    frame = _frame()
    ds = _load(_write_csv(frame, tmp_path / "log.csv"))
    art = ds.info["table"]
    user = art["categorical"]["user"]
    # Vocabulary: training rows only, count >= 2, most frequent first, ties by text.
    counts = user["counts"]
    assert all(c >= 2 for c in counts) and counts == sorted(counts, reverse=True)
    pairs = list(zip(counts, user["values"], strict=True))
    assert pairs == sorted(pairs, key=lambda p: (-p[0], p[1]))
    # The counts are the training split's.
    full = ds.train.features["user"]
    assert int(full.min()) >= OOV_ID and int(full.max()) < user["vocab_size"]
    for k in range(len(user["values"])):
        assert int((full == RESERVED + k).sum()) == counts[k]
    # item: missing = "oov" -> the empty value takes id 1; user has no missing values.
    assert art["categorical"]["item"]["missing_id"] == OOV_ID
    # Multi-valued: width = longest kept bag (max_len 3), padded with 0, first items kept.
    tags = ds.train.features["tags"]
    assert tags.shape[1] == 3 and int(tags.min()) == 0
    values = art["categorical"]["tags"]["values"]
    row0 = [t for t in frame.loc[0, "tags"].split("|") if t][:3]
    # Row 0's bag, read back in input order through scoring mode.
    all_keys = _load(tmp_path / "log.csv", scoring=True, vocab_from=_save(ds, tmp_path / "run")).info["keys"]
    assert all_keys == frame["rid"].tolist()
    ids0 = [values[i - RESERVED] if i >= RESERVED else None for i in
            _load(tmp_path / "log.csv", scoring=True, vocab_from=tmp_path / "run").test.features["tags"][0].tolist()
            if i != 0]
    assert ids0 == row0
    # Hashed field: 3 + blake2b64(value, seed 5) % 16.
    city = ds.info["table"]["categorical"]["city"]
    assert city["vocab_size"] == RESERVED + 16 and city["values"] is None
    scored = _load(tmp_path / "log.csv", scoring=True, vocab_from=tmp_path / "run")
    want = [RESERVED + stable_hash(c, 5) % 16 for c in frame["city"]]
    assert scored.test.features["city"].tolist() == want


def _save(ds: moefast.data.MultiDomainDataset, run: Path) -> Path:
    table_mod.save_vocab(ds, run)
    return run


def test_missing_values_and_bags_map_to_their_ids(tmp_path: Path) -> None:
    frame = _frame()
    frame.loc[5, "user"] = ""
    frame.loc[6, "tags"] = "||"
    frame.loc[7, "tags"] = "t1|t1|t2|t3|t4|t5"
    ds = _load(_write_csv(frame, tmp_path / "log.csv"))
    run = _save(ds, tmp_path / "run")
    scored = _load(tmp_path / "log.csv", scoring=True, vocab_from=run).test
    assert int(scored.features["user"][5]) == MISSING_ID  # missing = "own"
    assert int(scored.features["item"][3]) == OOV_ID  # missing = "oov"
    assert scored.features["tags"][6].tolist() == [0, 0, 0]  # empty bag: all padding
    values = ds.info["table"]["categorical"]["tags"]["values"]
    assert [values[i - RESERVED] for i in scored.features["tags"][7].tolist()] == ["t1", "t1", "t2"]


def test_numeric_transforms_match_numpy(tmp_path: Path) -> None:
    frame = _frame()
    ds = _load(_write_csv(frame, tmp_path / "log.csv"), vocab_from=None)
    run = _save(ds, tmp_path / "run")
    scored = _load(tmp_path / "log.csv", scoring=True, vocab_from=run).test  # every row, in order
    stats = ds.info["table"]["numeric"]
    train_keys = _train_keys(ds, frame, tmp_path)
    is_train = frame["rid"].isin(train_keys).to_numpy()

    price = pd.to_numeric(frame["price"]).to_numpy()
    lp = np.log1p(price)
    seen = lp[is_train & ~np.isnan(lp)]
    assert stats["price"]["mean"] == pytest.approx(seen.mean(), rel=1e-12)
    assert stats["price"]["std"] == pytest.approx(seen.std(), rel=1e-12)
    want = np.where(np.isnan(price), 0.5, (lp - seen.mean()) / seen.std()).astype(np.float32)
    np.testing.assert_array_equal(scored.features["price"].numpy(), want)
    np.testing.assert_array_equal(scored.features["price_missing"].numpy(), np.isnan(price).astype(np.float32))

    age = frame["age"].astype(float).to_numpy()
    m, s = age[is_train].mean(), age[is_train].std()
    np.testing.assert_array_equal(scored.features["age"].numpy(), ((age - m) / s).astype(np.float32))
    np.testing.assert_array_equal(scored.features["score"].numpy(), frame["score"].astype(float).to_numpy().astype(np.float32))
    np.testing.assert_array_equal(scored.features["count"].numpy(),
                                  np.log1p(frame["count"].astype(float).to_numpy()).astype(np.float32))


def _train_keys(ds: moefast.data.MultiDomainDataset, frame: pd.DataFrame, tmp_path: Path) -> set[str]:
    # The loader's random split is moefast.data.splits.assign_splits over (domain, label).
    from moefast.data.splits import assign_splits

    names = list(ds.domain_names)
    dom = np.array([names.index(v) for v in frame["site"]])
    part = assign_splits(dom, frame["click"].astype(float).to_numpy())
    return set(frame["rid"][part == 0])


def test_vocabularies_are_saved_and_reused_bit_for_bit(tmp_path: Path) -> None:
    frame = _frame()
    path = _write_csv(frame, tmp_path / "log.csv")
    ds = _load(path)
    run = _save(ds, tmp_path / "run")
    text = (run / "vocab.json").read_bytes()
    again = _load(path, vocab_from=run)
    _same(ds, again)
    _save(again, tmp_path / "run2")
    assert (tmp_path / "run2" / "vocab.json").read_bytes() == text
    # A method's subdirectory refers to the top file.
    (run / "mlora").mkdir()
    (run / "mlora" / "data.json").write_text(json.dumps({"vocab": "../vocab.json"}))
    assert read_vocab(run / "mlora")[0] == json.loads(text)
    # New data: unseen values take the OOV id, seen ones their old ids.
    new = frame.copy()
    new["user"] = ["never-seen"] * len(new)
    new.loc[0, "user"] = ds.info["table"]["categorical"]["user"]["values"][0]
    scored = _load(_write_csv(new, tmp_path / "new.csv"), scoring=True, vocab_from=run / "mlora")
    users = scored.test.features["user"]
    assert int(users[0]) == RESERVED and bool((users[1:] == OOV_ID).all())


def test_unseen_values_in_validation_map_to_oov(tmp_path: Path) -> None:
    frame = _frame()
    frame["split"] = ["train"] * 300 + ["val"] * 50 + ["test"] * 50
    frame.loc[320, "user"] = "only-in-val"
    schema = {**SCHEMA, "split": {"kind": "column", "column": "split"}}
    ds = _load(_write_csv(frame, tmp_path / "log.csv"), schema)
    assert len(ds.train) == 300 and len(ds.val) == 50
    assert "only-in-val" not in ds.info["table"]["categorical"]["user"]["values"]
    assert int(ds.val.features["user"][20]) == OOV_ID


def test_time_split_and_domain_policies(tmp_path: Path) -> None:
    frame = _frame()
    frame["ts"] = np.arange(len(frame))
    frame.loc[:4, "site"] = "rare"
    schema = {**SCHEMA, "split": {"kind": "time", "column": "ts", "cuts": [200, 300]},
              "domain": {"column": "site", "min_rows": 6, "policy": "drop"}}
    path = _write_csv(frame, tmp_path / "log.csv")
    ds = _load(path, schema)
    assert ds.domain_names == ("a", "b", "c") and ds.info["dropped_rows"] == 5
    assert len(ds.train) == 195 and len(ds.val) == 100 and len(ds.test) == 100
    other = _load(path, {**schema, "domain": {"column": "site", "min_rows": 6, "policy": "other"}})
    assert other.domain_names == ("a", "b", "c", "other") and int((other.train.domain == 3).sum()) == 5
    with pytest.raises(ValueError, match=r"domain 'rare' has 5 rows, fewer than domain.min_rows = 6"):
        _load(path, {**schema, "domain": {"column": "site", "min_rows": 6}})
    many = _load(path, {**schema, "domain": {"column": "site", "max_domains": 2, "policy": "other"}})
    assert len(many.domain_names) == 2 and many.domain_names[-1] == "other"
    # max_domains counts the folded domain: 3 real domains + "rare" folded -> 2 kept + "other".
    folded = _load(path, {**schema, "domain": {"column": "site", "min_rows": 6, "max_domains": 3, "policy": "other"}})
    assert len(folded.domain_names) == 3 and folded.domain_names[-1] == "other"


def test_scoring_needs_a_run_and_keeps_keys_in_order(tmp_path: Path) -> None:
    frame = _frame()
    path = _write_csv(frame, tmp_path / "log.csv")
    with pytest.raises(ValueError, match="vocab_from"):
        _load(path, {k: v for k, v in SCHEMA.items() if k != "label"})
    run = _save(_load(path), tmp_path / "run")
    unlabeled = _write_csv(frame.drop(columns=["click"]), tmp_path / "unlabeled.csv")
    ds = _load(unlabeled, {k: v for k, v in SCHEMA.items() if k != "label"}, vocab_from=run)
    assert len(ds.train) == 0 and len(ds.test) == len(frame) and ds.info["keys"] == frame["rid"].tolist()


def test_a_cache_hit_carries_the_same_vocabularies(tmp_path: Path) -> None:
    path = _write_csv(_frame(), tmp_path / "log.csv")
    kw = {"path": path, "schema": SCHEMA, "cache_dir": tmp_path / "cache", "progress": False}
    first = moefast.data.load("table", **kw)
    second = moefast.data.load("table", **kw)
    assert not first.info["cache"]["hit"] and second.info["cache"]["hit"]
    _same(first, second)
    # Another schema is another entry.
    third = moefast.data.load("table", **{**kw, "schema": {**SCHEMA, "dim": 8}})
    assert not third.info["cache"]["hit"]


def test_pretrained_vectors_are_mapped_through_the_vocabulary(tmp_path: Path) -> None:
    frame = _frame()
    path = _write_csv(frame, tmp_path / "log.csv")
    vecs = {f"u{i}": [float(i), -float(i), 0.5, 1.0] for i in range(50)}
    (tmp_path / "users.csv").write_text("".join(f"{k},{','.join(map(str, v))}\n" for k, v in vecs.items()))
    schema = {**SCHEMA, "categorical": {**SCHEMA["categorical"], "user": {"min_count": 2, "pretrained": str(tmp_path / "users.csv")}}}
    ds = _load(path, schema)
    table = ds.pretrained["user"]
    values = ds.info["table"]["categorical"]["user"]["values"]
    assert table.shape == (RESERVED + len(values), 4) and bool((table[:RESERVED] == 0).all())
    for k, v in enumerate(values):
        assert table[RESERVED + k].tolist() == vecs[v]
    model = moefast.models.build("deepfm", ds)
    assert torch.equal(model.embedding.tables["user"].detach(), table)


def test_stable_hash_known_answers_in_another_process() -> None:
    # Known answers of BLAKE2b-64 (RFC 7693) keyed by the seed's 8 little-endian bytes, computed
    # in a fresh interpreter with another PYTHONHASHSEED: never Python's salted hash().
    want = {("user_42", 0): 355006681296020221, ("user_42", 7): 7107835326923254360,
            ("", 0): 4331143152044847043, ("é", 2**64 - 1): 16913898963951191388}
    # The module file alone (it needs only hashlib and numpy), so the child skips importing torch.
    code = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('v', sys.argv[2]); "
            "v = importlib.util.module_from_spec(spec); spec.loader.exec_module(v); "
            "print(json.dumps([v.stable_hash(x, s) for x, s in json.loads(sys.argv[1])]))")
    module = Path(moefast.data.vocab.__file__)
    for salt in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, json.dumps(list(want)), str(module)], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONHASHSEED": salt})
        assert json.loads(out.stdout) == list(want.values())
    assert [stable_hash(v, s) for v, s in want] == list(want.values())
    assert stable_hash("user_42", 0) != stable_hash("user_42", 1)


# --- errors: each names the file, the row and the column ---------------------------------------


def test_a_missing_column_is_named(tmp_path: Path) -> None:
    path = _write_csv(_frame().drop(columns=["age"]), tmp_path / "log.csv")
    with pytest.raises(ValueError, match=r"log\.csv, column 'age': missing column"):
        _load(path)


def test_a_label_outside_0_1_names_its_row(tmp_path: Path) -> None:
    frame = _frame()
    frame.loc[123, "click"] = "2"
    path = _write_csv(frame, tmp_path / "log.csv")
    with pytest.raises(ValueError, match=r"log\.csv, row 124, column 'click': label 2 outside \{0, 1\}"):
        _load(path)
    ds = _load(path, {**SCHEMA, "label_threshold": 1.0})  # the documented threshold mapping
    assert set(ds.train.label.unique().tolist()) <= {0.0, 1.0}
    pq_path = _write_parquet(frame, tmp_path / "log.parquet")
    with pytest.raises(ValueError, match=r"log\.parquet, row 124, column 'click'"):
        _load(pq_path)


def test_a_non_number_in_a_numeric_column_names_its_row(tmp_path: Path) -> None:
    frame = _frame()
    frame.loc[250, "age"] = "forty"
    mp = pytest.MonkeyPatch()
    mp.setattr(table_mod, "CSV_BLOCK_BYTES", 4096)  # the bad row sits in a later block
    try:
        with pytest.raises(ValueError, match=r"log\.csv, row 251, column 'age': not a number: 'forty'"):
            _load(_write_csv(frame, tmp_path / "log.csv"))
    finally:
        mp.undo()
    frame.loc[250, "age"] = "inf"
    with pytest.raises(ValueError, match=r"row 251, column 'age': not a finite number"):
        _load(_write_csv(frame, tmp_path / "log2.csv"))


def test_an_empty_domain_is_an_error(tmp_path: Path) -> None:
    frame = _frame()
    frame.loc[9, "site"] = ""
    with pytest.raises(ValueError, match=r"log\.csv, row 10, column 'site': empty domain value"):
        _load(_write_csv(frame, tmp_path / "log.csv"))
    path = _write_csv(_frame(), tmp_path / "ok.csv")
    with pytest.raises(ValueError, match=r"column 'site': domain 'z' named in domain.order has no rows"):
        _load(path, {**SCHEMA, "domain": {"column": "site", "order": ["a", "b", "c", "z"]}})
    frame = _frame()
    frame["split"] = np.where(frame["site"] == "c", "val", "train")
    with pytest.raises(ValueError, match=r"domain 'c' has no training rows"):
        _load(_write_csv(frame, tmp_path / "split.csv"), {**SCHEMA, "split": {"kind": "column", "column": "split"}})


def test_schema_errors_name_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "schema.toml"
    bad.write_text('label = "click"\n[domain]\ncolumn = "site"\n[categorical.user]\ndimm = 4\n')
    with pytest.raises(ValueError, match=r"schema\.toml: unknown schema key 'categorical\.user\.dimm'"):
        load_schema(bad)
    bad.write_text('label = "click"\nlabl = 1\n[domain]\ncolumn = "site"\n')
    with pytest.raises(ValueError, match=r"schema\.toml: unknown schema key 'labl'"):
        load_schema(bad)
    bad.write_text('[domain]\ncolumn = "site"\n[numeric.x]\ntransform = "log"\n')
    with pytest.raises(ValueError, match=r"numeric\.x\.transform' must be one of"):
        load_schema(bad)
    with pytest.raises(ValueError, match="missing table"):
        TableSchema.from_dict({"label": "y"})
    good = load_schema(Path(__file__).parents[1] / "examples" / "clicklog" / "schema.toml")
    assert TableSchema.from_dict(good.to_dict(), good.source) == good


def test_a_reused_vocabulary_must_describe_the_same_fields(tmp_path: Path) -> None:
    path = _write_csv(_frame(), tmp_path / "log.csv")
    run = _save(_load(path), tmp_path / "run")
    other = {**SCHEMA, "categorical": {**SCHEMA["categorical"], "user": {"min_count": 2, "dim": 8}}}
    with pytest.raises(ValueError, match=r"\[categorical\.user\] differs from the vocabulary's schema .* at 'dim': 8 here, 4 there"):
        _load(path, other, vocab_from=run)
    fewer = {**SCHEMA, "numeric": {k: v for k, v in SCHEMA["numeric"].items() if k != "age"}}
    with pytest.raises(ValueError, match=r"\[numeric\.age\] differs .* \(absent here\)"):
        _load(path, fewer, vocab_from=run)


def test_a_damaged_vocabulary_or_data_reference_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    """``read_vocab`` reads through the one JSON reader: a damaged file names itself and the line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "vocab.json").write_text('{"format": "moefast-vocab",\n "version": 1,,}\n')
    with pytest.raises(ValueError, match=r"vocabulary file '.*vocab\.json' is damaged: .* at line 2"):
        read_vocab(run)
    method = run / "base"
    method.mkdir()
    (method / "data.json").write_text('{"vocab": \n')
    with pytest.raises(ValueError, match=r"data reference .*'.*base/data\.json' is damaged: .* at line 2"):
        read_vocab(method)
    (method / "data.json").write_text("[]")
    with pytest.raises(ValueError, match=r"data reference .*data\.json' is not a JSON object"):
        read_vocab(method)


def test_the_command_line_saves_the_vocabularies_once_and_reuses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moefast import cli

    path = _write_csv(_frame(), tmp_path / "log.csv")
    schema = tmp_path / "schema.toml"
    schema.write_text('label = "click"\ndim = 4\n[domain]\ncolumn = "site"\n[categorical.user]\n'
                      '[categorical.tags]\nmulti = true\nmax_len = 3\n[numeric.price]\ntransform = "log1p"\n')
    common = ["train", "--dataset", "table", "--data", str(path), "--schema", str(schema), "--quiet",
              "--max-epochs", "1", "--batch-size", "128", "--method", "base,mlora"]
    out = tmp_path / "run"
    assert cli.main([*common, "--out", str(out)]) == 0
    vocab = json.loads((out / "vocab.json").read_text())
    assert sorted(vocab["categorical"]) == ["tags", "user"] and vocab["domains"]["names"] == ["a", "b", "c"]
    for method in ("base", "mlora"):
        assert json.loads((out / method / "data.json").read_text()) == {"vocab": "../vocab.json"}
        assert not (out / method / "vocab.json").exists()
    again = tmp_path / "again"
    assert cli.main([*common, "--out", str(again), "--vocab-from", str(out / "mlora")]) == 0
    assert (again / "vocab.json").read_bytes() == (out / "vocab.json").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--dataset", "table", "--data", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "needs --data PATH and --schema" in capsys.readouterr().err
    assert cli.main([*common, "--out", str(tmp_path / "y"), "--rows", "10"]) == 2
    assert "--rows does not apply to --dataset table" in capsys.readouterr().err


def test_a_malformed_csv_names_the_file_and_a_bom_is_not_a_name(tmp_path: Path) -> None:
    text = _frame().to_csv(index=False)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    _same(_load(_write_csv(_frame(), tmp_path / "log.csv")), _load(tmp_path / "bom.csv"))
    lines = text.splitlines()
    lines[40] = lines[40].rsplit(",", 1)[0]  # a row one field short
    (tmp_path / "short.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"short\.csv, row 40: malformed CSV \(.*Expected 11 columns, got 10"):
        _load(tmp_path / "short.csv")


def test_an_unseen_domain_at_scoring_folds_into_other_or_is_refused(tmp_path: Path) -> None:
    frame = _frame()
    frame.loc[:4, "site"] = "rare"
    path = _write_csv(frame, tmp_path / "log.csv")
    unlabeled = {k: v for k, v in SCHEMA.items() if k != "label"}
    for policy, want in (("other", 3), ("error", None)):
        domain = {"column": "site", "min_rows": 6, "policy": policy if policy == "other" else "drop"}
        run = _save(_load(path, {**SCHEMA, "domain": domain}), tmp_path / f"run-{policy}")
        new = frame.copy()
        new.loc[7, "site"] = "brand-new"
        new_path = _write_csv(new, tmp_path / f"new-{policy}.csv")
        scoring = {**unlabeled, "domain": {**domain, "policy": policy}}
        if want is None:
            with pytest.raises(ValueError, match=r"new-error\.csv, row 1, column 'site': domain 'rare' is not in"):
                _load(new_path, scoring, vocab_from=run)
        else:
            scored = _load(new_path, scoring, vocab_from=run).test
            assert scored.domain[:5].tolist() == [want] * 5 and int(scored.domain[7]) == want


def test_pretrained_vectors_from_parquet_lists(tmp_path: Path) -> None:
    path = _write_csv(_frame(), tmp_path / "log.csv")
    keys = [f"u{i}" for i in range(50)]
    pq.write_table(pa.table({"value": keys, "vector": [[float(i)] * 4 for i in range(50)]}), tmp_path / "vec.parquet")
    schema = {**SCHEMA, "categorical": {**SCHEMA["categorical"], "user": {"pretrained": str(tmp_path / "vec.parquet")}}}
    ds = _load(path, schema)
    values = ds.info["table"]["categorical"]["user"]["values"]
    assert ds.pretrained["user"][RESERVED:].tolist() == [[float(v[1:])] * 4 for v in values]
    pq.write_table(pa.table({"value": keys, "vector": [[1.0] * 3] * 50}), tmp_path / "bad.parquet")
    schema["categorical"]["user"] = {"pretrained": str(tmp_path / "bad.parquet")}
    with pytest.raises(ValueError, match=r"bad\.parquet: vectors of width 3, field 'user' has dim 4"):
        _load(path, schema)


def test_one_column_can_feed_a_categorical_and_a_numeric_field(tmp_path: Path) -> None:
    schema = {**SCHEMA, "categorical": {**SCHEMA["categorical"], "age_bucket": {"column": "age"}}}
    for path in (_write_csv(_frame(), tmp_path / "log.csv"), _write_parquet(_frame(), tmp_path / "log.parquet")):
        ds = _load(path, schema)
        ages = ds.info["table"]["categorical"]["age_bucket"]["values"]
        ids = ds.train.features["age_bucket"]
        want = torch.tensor([float(ages[i - RESERVED]) if i >= RESERVED else float("nan") for i in ids.tolist()])
        stats = ds.info["table"]["numeric"]["age"]
        torch.testing.assert_close(ds.train.features["age"], ((want - stats["mean"]) / stats["std"]).float())


def test_hive_partition_folders_are_columns(tmp_path: Path) -> None:
    """Spark's and Hive's partitioned output: ``key=value`` folders, nested, percent-escaped, with
    ``__HIVE_DEFAULT_PARTITION__`` for a missing value, give the dataset of the flat file whose
    rows are the partitions' in sorted order; a stray folder, mixed keys and a column that is
    both in the files and in the folders are refused; renaming a partition misses the cache."""
    frame = _frame()
    frame.loc[frame["site"] == "c", "site"] = "c/x"  # written as site=c%2Fx
    frame.loc[frame["city"] == "kyiv", "city"] = ""  # written as city=__HIVE_DEFAULT_PARTITION__
    root = tmp_path / "hive"
    order = []
    for (site, city), rows in sorted(frame.groupby(["site", "city"]).groups.items(),
                                     key=lambda kv: (kv[0][0].replace("/", "%2F"), kv[0][1] or "__HIVE_DEFAULT_PARTITION__")):
        folder = root / f"site={site.replace('/', '%2F')}" / f"city={city or '__HIVE_DEFAULT_PARTITION__'}"
        folder.mkdir(parents=True)
        _write_csv(frame.loc[rows].drop(columns=["site", "city"]), folder / "part-00000.csv")
        (folder / "part-00000.csv.crc").write_text("")
        order.extend(rows)
    (root / "_SUCCESS").write_text("")
    flat = _write_csv(frame.loc[order], tmp_path / "flat.csv")
    _same(_load(flat), _load(root))
    assert "c/x" in _load(root).domain_names

    (root / "misc").mkdir()
    with pytest.raises(ValueError, match=r"holds the folder 'misc', which is neither a part file nor a Hive partition"):
        _load(root)
    (root / "misc").rmdir()
    _write_csv(frame.drop(columns=["site", "city"]).head(5), root / "part-extra.csv")
    with pytest.raises(ValueError, match=r"partition folders name different keys"):
        _load(root)
    (root / "part-extra.csv").unlink()
    both = next(root.glob("site=a/city=*"))
    _write_csv(frame[frame["site"] == "a"].drop(columns=["city"]), both / "part-00000.csv")
    with pytest.raises(table_mod.TableError, match=r"site.*both a column of the file and a partition"):
        _load(root)

    cached = tmp_path / "cached"
    cached.mkdir()
    (cached / "site=a").mkdir()
    (cached / "site=b").mkdir()
    _write_csv(frame.head(200).drop(columns=["site"]), cached / "site=a" / "part-0.csv")
    _write_csv(frame.tail(200).drop(columns=["site"]), cached / "site=b" / "part-0.csv")
    load = lambda: moefast.data.load("table", path=cached, schema=SCHEMA, cache_dir=tmp_path / "cache", progress=False)
    assert load().domain_names == ("a", "b") and load().info["cache"]["hit"]
    (cached / "site=b").rename(cached / "site=z")
    again = load()
    assert again.domain_names == ("a", "z") and not again.info["cache"]["hit"]


def test_a_quoted_field_may_hold_a_line_break_wherever_a_block_ends(tmp_path: Path) -> None:
    """Quoted line breaks load the same whatever the CSV block size (pyarrow's parallel chunker
    used to lose sync when a block ended inside such a field)."""
    frame = _frame()
    frame["rid"] = [f"r{i}\nsecond line\nthird" for i in range(len(frame))]
    path = _write_csv(frame, tmp_path / "log.csv")
    ref = _load(path)
    mp = pytest.MonkeyPatch()
    try:
        for block in (1000, 1001, 1003, 2048, 4093):
            mp.setattr(table_mod, "CSV_BLOCK_BYTES", block)
            _same(ref, _load(path))
    finally:
        mp.undo()
    _same(ref, _load(_write_csv(frame.assign(rid=[f"r{i}" for i in range(len(frame))]), tmp_path / "plain.csv")))


def test_hive_folders_links_repeated_keys_and_empty_values(tmp_path: Path) -> None:
    """A link to a folder (it could loop back up and read the files again and again) and a key
    named twice on one path are refused; ``key=`` is a missing value like an empty CSV field; the
    dataset is named after the folder, not its first partition."""
    frame = _frame()
    root = tmp_path / "log"
    for site, rows in frame.groupby("site").groups.items():
        folder = root / f"site={site}"
        folder.mkdir(parents=True)
        _write_csv(frame.loc[rows].drop(columns=["site"]), folder / "part-0.csv")
    assert _load(root).name == "table-log"
    (root / "site=a" / "site=b").symlink_to(root)
    with pytest.raises(ValueError, match=r"'site=a/site=b' is a link to a folder"):
        _load(root)
    (root / "site=a" / "site=b").unlink()
    (root / "site=a" / "site=c").mkdir()
    _write_csv(frame.head(3).drop(columns=["site"]), root / "site=a" / "site=c" / "part-0.csv")
    with pytest.raises(ValueError, match=r"names the partition key 'site' twice"):
        _load(root)
    empty = tmp_path / "empty"
    for city, rows in frame.groupby("city").groups.items():
        folder = empty / f"city={'' if city == 'kyiv' else city}"
        folder.mkdir(parents=True)
        _write_csv(frame.loc[rows].drop(columns=["city"]), folder / "part-0.csv")
    flat = frame.copy()
    flat.loc[flat["city"] == "kyiv", "city"] = ""
    order = [i for _, rows in sorted(flat.groupby("city").groups.items()) for i in rows]
    _same(_load(_write_csv(flat.loc[order], tmp_path / "flat.csv")), _load(empty))
