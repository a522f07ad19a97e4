"""MovieLens-1M loader on small files written in the raw format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moefast
from moefast.data import movielens

USERS = [  # UserID::Gender::Age::Occupation::Zip-code
    "1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117",
    "5::F::25::20::55455", "7::M::35::1::06810",
]
MOVIES = [  # MovieID::Title::Genres (ISO-8859-1)
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::Jumanji (1995)::Adventure|Children's|Fantasy",
    "10::Café au lait (Métisse) (1993)::Comedy",
    "11::Crêpes, Stars & Crowns (1934)::Drama",
]


def _ratings(n: int = 60) -> list[str]:
    users, movies = [1, 2, 3, 5, 7], [1, 2, 10, 11]
    return [f"{users[k % 5]}::{movies[(k // 5) % 4]}::{1 + k % 5}::97830{k:04d}" for k in range(n)]


def _write(d: Path, users: list[str] = USERS, movies: list[str] = MOVIES, ratings: list[str] | None = None) -> Path:
    d.mkdir(exist_ok=True)
    (d / "users.dat").write_text("\n".join(users) + "\n", encoding="ascii")
    (d / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("iso-8859-1"))
    (d / "ratings.dat").write_text("\n".join(_ratings() if ratings is None else ratings) + "\n")
    return d


def test_loads_raw_files(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw")
    ds = moefast.data.load("movielens-1m", raw_dir=raw, domain="gender", cache_dir=tmp_path / "c")
    assert ds.domain_names == ("F", "M")
    assert [(f.name, f.vocab_size, f.dim) for f in ds.features] == [("uid", 5, 8), ("item", 4, 8), ("domain", 2, 8)]
    # ISO-8859-1 titles decode to the right letters (as UTF-8 they would fail or garble).
    assert ds.info["item_names"][2] == "Café au lait (Métisse) (1993)"  # type: ignore[index]
    split = (ds.train, ds.val, ds.test)
    uid = torch.cat([s.features["uid"] for s in split])
    item = torch.cat([s.features["item"] for s in split])
    dom = torch.cat([s.domain for s in split])
    label = torch.cat([s.label for s in split])
    # Rebuild the expected rows from the raw lines: contiguous ids in sorted raw-id order,
    # gender F=0 / M=1, label = (rating == 5).
    uix, mix, gender = {1: 0, 2: 1, 3: 2, 5: 3, 7: 4}, {1: 0, 2: 1, 10: 2, 11: 3}, {1: 0, 2: 1, 3: 1, 5: 0, 7: 1}
    want = sorted(
        (uix[int(u)], mix[int(m)], gender[int(u)], float(int(r) == 5))
        for u, m, r, _ in (line.split("::") for line in _ratings())
    )
    got = sorted(zip(uid.tolist(), item.tolist(), dom.tolist(), label.tolist(), strict=True))
    assert got == want
    assert torch.equal(torch.cat([s.features["domain"] for s in split]), dom)


@pytest.mark.parametrize(("domain", "names"), [
    ("age", movielens.DOMAINS["age"][2]),
    ("occupation", movielens.DOMAINS["occupation"][2]),
])
def test_age_and_occupation_domains(tmp_path: Path, domain: str, names: tuple[str, ...]) -> None:
    # Give every age group / occupation one user so that no domain is empty.
    values = movielens.DOMAINS[domain][1]
    users = [f"{k + 1}::{'FM'[k % 2]}::{values[k] if domain == 'age' else 25}::"
             f"{values[k] if domain == 'occupation' else 0}::00000" for k in range(len(values))]
    ratings = [f"{k + 1}::{1 + k % 2}::5::0" for k in range(len(values))]
    raw = _write(tmp_path / "raw", users=users, ratings=ratings)
    ds = moefast.data.load("movielens-1m", raw_dir=raw, domain=domain, cache_dir=tmp_path / "c")
    assert ds.domain_names == names and ds.num_domains == len(values)
    split = (ds.train, ds.val, ds.test)
    uid = torch.cat([s.features["uid"] for s in split])
    # User k sits in domain k: the remap follows the documented order.
    assert torch.equal(torch.cat([s.domain for s in split]), uid)


def test_second_load_skips_preprocessing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _write(tmp_path / "raw")
    first = moefast.data.load("movielens-1m", raw_dir=raw, cache_dir=tmp_path / "c")

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("parsed raw files on a cache hit")

    monkeypatch.setattr(movielens, "_build", no_parsing)
    second = moefast.data.load("movielens-1m", raw_dir=raw, cache_dir=tmp_path / "c")
    assert second.info["cache"]["hit"] is True  # type: ignore[index]
    assert torch.equal(first.train.features["uid"], second.train.features["uid"])
    # Another option, or an edited raw file, is another fingerprint: it must parse again.
    with pytest.raises(AssertionError, match="cache hit"):
        moefast.data.load("movielens-1m", raw_dir=raw, domain="age", cache_dir=tmp_path / "c")
    (raw / "ratings.dat").write_text("\n".join(_ratings(59)) + "\n")
    with pytest.raises(AssertionError, match="cache hit"):
        moefast.data.load("movielens-1m", raw_dir=raw, cache_dir=tmp_path / "c")


@pytest.mark.parametrize(("file", "lines", "message"), [
    ("ratings.dat", [*_ratings()[:3], "1::2::5", *_ratings()[4:]], r"ratings\.dat, line 4: expected 4"),
    ("ratings.dat", [*_ratings()[:6], "1::2::x::0"], r"ratings\.dat, line 7: field 'Rating': not an integer"),
    ("ratings.dat", [*_ratings()[:2], "1::2::6::0"], r"ratings\.dat, line 3: field 'Rating': outside 1\.\.5"),
    ("ratings.dat", [*_ratings(), "4::1::3::0"], r"ratings\.dat, line 61: field 'UserID': user not in users\.dat"),
    ("ratings.dat", ["1::99::3::0", *_ratings()], r"ratings\.dat, line 1: field 'MovieID': movie not in movies\.dat"),
    ("users.dat", [*USERS[:2], "3::X::25::15::55117", *USERS[3:]], r"users\.dat, line 3: field 'Gender': unknown value"),
    ("users.dat", [*USERS[:4], "7::M::33::1::06810"], r"users\.dat, line 5: field 'Age': unknown value"),
    ("users.dat", [*USERS, "2::M::56::16::70072"], r"users\.dat, line 6: field 'UserID': duplicate"),
    ("movies.dat", [*MOVIES[:1], "2::Jumanji (1995)", *MOVIES[2:]], r"movies\.dat, line 2: expected 3"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, file: str, lines: list[str], message: str) -> None:
    raw = _write(tmp_path / "raw")
    (raw / file).write_bytes(("\n".join(lines) + "\n").encode("iso-8859-1"))
    with pytest.raises(ValueError, match=message):
        moefast.data.load("movielens-1m", raw_dir=raw, cache_dir=tmp_path / "c")


def test_user_mistakes(tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw")
    with pytest.raises(ValueError, match="'zodiac'"):
        moefast.data.load("movielens-1m", raw_dir=raw, domain="zodiac")
    with pytest.raises(ValueError, match="raw_dir"):
        moefast.data.load("movielens-1m")
    with pytest.raises(ValueError, match="'domian'"):
        moefast.data.load("movielens-1m", raw_dir=raw, domian="age")
    (raw / "movies.dat").unlink()
    with pytest.raises(ValueError, match=r"movies\.dat"):
        moefast.data.load("movielens-1m", raw_dir=raw, cache_dir=tmp_path / "c")
    # Only women rated, so the domain M is empty.
    raw2 = _write(tmp_path / "raw2", ratings=["1::1::5::0", "5::2::4::0"])
    with pytest.raises(ValueError, match="no ratings in domain 'M'"):
        moefast.data.load("movielens-1m", raw_dir=raw2, cache_dir=tmp_path / "c")
