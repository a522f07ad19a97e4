"""Amazon-6 loader on small files written in the 5-core review format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

import moefast
from moefast.data import amazon

# Both releases' file names, gzipped or not.
FILES = {
    "Video_Games": "Video_Games_5.json.gz",
    "Office_Products": "reviews_Office_Products_5.json.gz",
    "Toys_and_Games": "Toys_and_Games_5.json",
    "Musical_Instruments": "Musical_Instruments_5.json.gz",
    "Digital_Music": "Digital_Music_5.json.gz",
    "Prime_Pantry": "Prime_Pantry_5.json.gz",
}


def _reviews(category: str) -> list[tuple[str, str]]:
    k = len(category)
    return [(f"U{(k + j) % 7}", f"B{category[:2]}{j % 5}") for j in range(12)]


def _line(user: str, item: str) -> str:
    return json.dumps({"overall": 5.0, "verified": True, "reviewerID": user, "asin": item,
                       "reviewText": "Très bien — works", "unixReviewTime": 1252800000})


def _write(d: Path, lines: dict[str, list[str]] | None = None) -> Path:
    d.mkdir(exist_ok=True)
    for category, name in FILES.items():
        body = lines[category] if lines and category in lines else [_line(u, i) for u, i in _reviews(category)]
        data = ("\n".join(body) + "\n").encode("utf-8")
        (d / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return d


def test_six_categories_positives_are_the_distinct_reviews(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw")
    ds = moefast.data.load("amazon-6", raw_dir=raw, cache_dir=tmp_path / "c")
    assert ds.name == "amazon-6" and ds.domain_names == tuple(sorted(FILES))
    assert all(f.dim == 8 for f in ds.features)
    s = (ds.train, ds.val, ds.test)
    uid, item = torch.cat([x.features["uid"] for x in s]), torch.cat([x.features["item"] for x in s])
    dom, label = torch.cat([x.domain for x in s]), torch.cat([x.label for x in s])
    users = sorted({u for c in FILES for u, _ in _reviews(c)})
    items = sorted({i for c in FILES for _, i in _reviews(c)})
    want = sorted({(users.index(u), items.index(i), ds.domain_names.index(c)) for c in FILES for u, i in _reviews(c)})
    pos = label == 1
    assert sorted(zip(uid[pos].tolist(), item[pos].tolist(), dom[pos].tolist(), strict=True)) == want
    # Negatives are products of the same category the user did not review.
    for d in range(6):
        pool = set(item[pos & (dom == d)].tolist())
        reviewed = {(u, i) for u, i, dd in want if dd == d}
        for u, i in zip(uid[~pos & (dom == d)].tolist(), item[~pos & (dom == d)].tolist(), strict=True):
            assert i in pool and (u, i) not in reviewed


def test_categories_option_orders_domains(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw")
    ds = moefast.data.load("amazon-6", raw_dir=raw, categories=["Prime_Pantry", "Video_Games"],
                           cache_dir=tmp_path / "c")
    assert ds.domain_names == ("Prime_Pantry", "Video_Games") and ds.name == "amazon-2"


def test_second_load_skips_preprocessing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _write(tmp_path / "raw")
    first = moefast.data.load("amazon-6", raw_dir=raw, cache_dir=tmp_path / "c")
    monkeypatch.setattr(amazon, "_build", lambda *a: pytest.fail("parsed raw files on a cache hit"))
    second = moefast.data.load("amazon-6", raw_dir=raw, cache_dir=tmp_path / "c")
    assert torch.equal(first.test.features["item"], second.test.features["item"])


@pytest.mark.parametrize(("lines", "message"), [
    ([_line("U1", "B1"), '{"reviewerID": "U2", "asin": '], r"Digital_Music_5\.json\.gz, line 2: not a JSON object"),
    ([_line("U1", "B1"), _line("U2", "B2"), '{"reviewerID": "U3"}'], r"Digital_Music_5\.json\.gz, line 3: field 'asin'"),
    (['{"reviewerID": 7, "asin": "B1"}'], r"Digital_Music_5\.json\.gz, line 1: field 'reviewerID'"),
    ([], r"Digital_Music_5\.json\.gz: no reviews"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, lines: list[str], message: str) -> None:
    raw = _write(tmp_path / "raw", {"Digital_Music": lines})
    with pytest.raises(ValueError, match=message):
        moefast.data.load("amazon-6", raw_dir=raw, cache_dir=tmp_path / "c")


def test_user_mistakes(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw")
    (raw / FILES["Prime_Pantry"]).unlink()
    with pytest.raises(ValueError, match="holds 5 5-core review file"):
        moefast.data.load("amazon-6", raw_dir=raw, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="'Books'"):
        moefast.data.load("amazon-6", raw_dir=raw, categories=["Books"], cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="raw_dir"):
        moefast.data.load("amazon-6", raw_dir=tmp_path / "nowhere")
