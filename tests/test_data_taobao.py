"""Taobao-N loader on small files written in the theme click log's raw format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moefast
from moefast.data import taobao

# user_id,item_id,theme_id,reach_time: theme 900 appears first, then 5, then 77.
CLICKS = [
    (10, 100, 900), (11, 101, 900), (10, 102, 900), (12, 100, 900), (13, 103, 900), (11, 104, 900),
    (20, 200, 5), (10, 201, 5), (21, 202, 5), (20, 203, 5), (22, 204, 5), (21, 205, 5),
    (30, 300, 77), (31, 301, 77),
    (12, 105, 900), (22, 206, 5), (14, 106, 900), (23, 207, 5),
]


def _write_log(d: Path, rows: list[str] | None = None) -> Path:
    d.mkdir(exist_ok=True)
    lines = ["user_id,item_id,theme_id,reach_time"]
    lines += rows if rows is not None else [
        f"{u},{i},{t},2018-09-0{1 + k % 9} 12:00:{k:02d}" for k, (u, i, t) in enumerate(CLICKS)]
    (d / "theme_click_log.csv").write_text("\n".join(lines) + "\n")
    return d


def _all(ds: moefast.data.MultiDomainDataset) -> tuple[torch.Tensor, ...]:
    s = (ds.train, ds.val, ds.test)
    return (torch.cat([x.features["uid"] for x in s]), torch.cat([x.features["item"] for x in s]),
            torch.cat([x.domain for x in s]), torch.cat([x.label for x in s]))


def test_themes_by_first_appearance_and_positives_are_the_clicks(tmp_path: Path) -> None:
    raw = _write_log(tmp_path / "raw")
    # An exact duplicate row (same reach_time) counts once.
    text = (raw / "theme_click_log.csv").read_text().splitlines()
    (raw / "theme_click_log.csv").write_text("\n".join([*text, text[1]]) + "\n")
    ds = moefast.data.load("taobao", raw_dir=raw, num_themes=2, cache_dir=tmp_path / "c")
    assert ds.name == "taobao-2" and ds.domain_names == ("900", "5")
    assert all(f.dim == 128 for f in ds.features)  # the seeds' dim without pretrained vectors
    uid, item, dom, label = _all(ds)
    kept = [(u, i, t) for u, i, t in CLICKS if t != 77]
    users, items = sorted({u for u, _, _ in kept}), sorted({i for _, i, _ in kept})
    want = sorted((users.index(u), items.index(i), (900, 5).index(t)) for u, i, t in kept)
    pos = label == 1
    assert sorted(zip(uid[pos].tolist(), item[pos].tolist(), dom[pos].tolist(), strict=True)) == want
    # Negatives follow the sampler's rule with the recorded ratios.
    ratios = ds.info["ctr_ratio"]
    for d in (0, 1):
        pool = set(item[pos & (dom == d)].tolist())
        for u in set(uid[pos & (dom == d)].tolist()):
            mine = pos & (dom == d) & (uid == u)
            clicked = set(item[mine].tolist())
            negs = item[~pos & (dom == d) & (uid == u)].tolist()
            assert set(negs) <= pool - clicked
            assert len(negs) == min(int(int(mine.sum()) / ratios[d] + 1e-9), len(pool - clicked))  # type: ignore[index]


def test_pretrained_vectors_in_both_accepted_layouts(tmp_path: Path) -> None:
    raw = _write_log(tmp_path / "raw")
    users = sorted({u for u, _, _ in CLICKS} - {14})  # user 14 has no vector: its click is dropped
    items = sorted({i for _, i, _ in CLICKS})
    uvec = {u: [u + 0.5, -u, 0.25, 1.0] for u in users}
    ivec = {i: [i / 8, 2.0, -0.5, i % 3] for i in items}
    # Users: one quoted text column of space-separated numbers; items: numeric columns.
    (raw / "user_embedding.csv").write_text(
        "user_id,emb\n" + "".join(f'{u},"{" ".join(map(str, v))}"\n' for u, v in uvec.items()))
    (raw / "item_embedding.csv").write_text(
        "item_id,e0,e1,e2,e3\n" + "".join(f"{i},{','.join(map(str, v))}\n" for i, v in ivec.items()))
    ds = moefast.data.load("taobao", raw_dir=raw, num_themes=3, cache_dir=tmp_path / "c")
    assert all(f.dim == 4 for f in ds.features)
    uid, _, _, label = _all(ds)
    assert len(uid[label == 1]) == len(CLICKS) - 1
    tables = ds.pretrained
    assert "pretrained" not in ds.info  # a typed part of the dataset, not a free-form key
    kept_users = sorted({u for u, _, _ in CLICKS if u != 14})
    kept_items = sorted({i for u, i, _ in CLICKS if u != 14})
    assert torch.equal(tables["uid"], torch.tensor([uvec[u] for u in kept_users]))
    assert torch.equal(tables["item"], torch.tensor([ivec[i] for i in kept_items]))
    # The vectors survive the cache.
    again = moefast.data.load("taobao", raw_dir=raw, num_themes=3, cache_dir=tmp_path / "c")
    assert again.info["cache"]["hit"] is True  # type: ignore[index]
    assert sorted(again.pretrained) == ["item", "uid"]
    assert torch.equal(again.pretrained["item"], tables["item"])
    assert torch.equal(again.pretrained["uid"], tables["uid"])


def test_second_load_skips_preprocessing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _write_log(tmp_path / "raw")
    first = moefast.data.load("taobao", raw_dir=raw, num_themes=2, cache_dir=tmp_path / "c")
    monkeypatch.setattr(taobao, "_build", lambda *a: pytest.fail("parsed raw files on a cache hit"))
    second = moefast.data.load("taobao", raw_dir=raw, num_themes=2, cache_dir=tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(_all(first), _all(second), strict=True))


@pytest.mark.parametrize(("rows", "message"), [
    (["10,100,900,t", "11,abc,900,t"], r"theme_click_log\.csv, line 3: field 'item_id': not an integer"),
    (["10,100,900,t", "11,101,900"], r"theme_click_log\.csv, line 3: expected 4 fields"),
    (["10,100,900,t,extra"], r"theme_click_log\.csv, line 2: expected 4 fields"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, rows: list[str], message: str) -> None:
    raw = _write_log(tmp_path / "raw", rows)
    with pytest.raises(ValueError, match=message):
        moefast.data.load("taobao", raw_dir=raw, num_themes=1, cache_dir=tmp_path / "c")


def test_user_mistakes(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "theme_click_log.csv").write_text("user_id,item_id,reach_time\n1,2,t\n")
    with pytest.raises(ValueError, match=r"theme_click_log\.csv, line 1: field 'theme_id': missing column"):
        moefast.data.load("taobao", raw_dir=raw, cache_dir=tmp_path / "c")
    _write_log(raw)
    with pytest.raises(ValueError, match="num_themes=10 but the log holds 3"):
        moefast.data.load("taobao", raw_dir=raw, cache_dir=tmp_path / "c")
    (raw / "user_embedding.csv").write_text("user_id,emb\n1,\"0 1\"\n")
    with pytest.raises(ValueError, match=r"item_embedding\.csv is missing"):
        moefast.data.load("taobao", raw_dir=raw, num_themes=1, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="num_themes"):
        moefast.data.load("taobao", raw_dir=raw, num_themes=0)
    with pytest.raises(ValueError, match="theme_click_log"):
        moefast.data.load("taobao", raw_dir=tmp_path)


def test_ragged_vectors_are_located(tmp_path: Path) -> None:
    raw = _write_log(tmp_path / "raw")
    (raw / "user_embedding.csv").write_text('user_id,emb\n10,"1 2 3"\n11,"1 2"\n')
    (raw / "item_embedding.csv").write_text('item_id,emb\n100,"1 2 3"\n')
    with pytest.raises(ValueError, match=r"user_embedding\.csv, line 3: field 'emb': vector of 2 numbers"):
        moefast.data.load("taobao", raw_dir=raw, num_themes=1, cache_dir=tmp_path / "c")
