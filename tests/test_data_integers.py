"""The one integer grammar of every raw loader, and bad bytes in the raw files (issue 15).

``int_problem`` / ``parse_int_column`` / ``read_dat`` / the Taobao CSV reader are checked against
an oracle written differently (a regex plus Python's ``int``) on hypothesis-drawn text that
mixes digits with everything ``int()``, pandas or numpy would also read as a number.
"""

from __future__ import annotations

import gzip
import re
import tempfile
from pathlib import Path

import pytest
import test_data_amazon as amazon_files
import test_data_movielens as movielens_files
import test_data_taobao as taobao_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moefast
from moefast.data import _raw, taobao

INT64_MAX = 2**63 - 1
_ORACLE = re.compile(r"[0-9]+", flags=re.ASCII)


def oracle(text: str) -> bool:
    """A strict integer field: ASCII digits only, and int64 holds it."""
    return _ORACLE.fullmatch(text) is not None and int(text) <= INT64_MAX


# What int(), float(), pandas or numpy would also take for a number, mixed with digits.
_TRICKY = "0123456789+-_. eExXbBoO\t\u00a0\u0665\u00b2\uff15"
texts = st.one_of(
    st.text(alphabet=_TRICKY, max_size=6),
    st.integers(min_value=0, max_value=2**64).map(str),  # across the int64 boundary
    st.sampled_from(["1e1", "4.9999999999999999", "1_0", " 5", "5 ", "+5", "-5", "0x5", "5.0", "",
                     "0", "007", str(INT64_MAX), str(INT64_MAX + 1), "9" * 19, "9" * 20, "\u0665"]),
)


@given(texts)
@settings(max_examples=400, deadline=None)
def test_int_problem_is_the_oracle(text: str) -> None:
    assert (_raw.int_problem(text) is None) == oracle(text)


@given(st.lists(texts, min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_parse_int_column_is_the_oracle(values: list[str]) -> None:
    bad = [k for k, v in enumerate(values) if not oracle(v)]
    if bad:
        with pytest.raises(_raw.BadInteger) as info:
            _raw.parse_int_column(values)
        assert info.value.index == bad[0] and info.value.value == values[bad[0]]
    else:
        parsed = _raw.parse_int_column(values)
        assert parsed.dtype.name == "int64" and parsed.tolist() == [int(v) for v in values]


def test_parse_int_column_fast_path_is_exact() -> None:
    # The vectorised path (every field 1 to 18 digits) and the exact one meet at 19 digits.
    values = ["0", "007", "9" * 18, str(INT64_MAX), "1"]
    assert _raw.parse_int_column(values).tolist() == [0, 7, 10**18 - 1, INT64_MAX, 1]
    # A value holding the separator the vectorised check joins on is not two integers.
    with pytest.raises(_raw.BadInteger) as info:
        _raw.parse_int_column(["1", "2\n3", "4"])
    assert info.value.index == 1


# Field text for one-line-per-record files: no separator or line break of the format.
field_texts = texts.filter(lambda t: not any(c in t for c in ":\n\r,\"\x0b\x0c\x1c\x1d\x1e\x85"))


@given(field_texts, st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=4))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_ratings_dat_is_the_oracle(text: str, column: int, line: int) -> None:
    names = ["UserID", "MovieID", "Rating", "Timestamp"]
    rows = [[str(1 + k), str(10 + k), str(1 + k % 5), str(978300000 + k)] for k in range(5)]
    rows[line][column] = text
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ratings.dat"
        path.write_bytes(("\n".join("::".join(r) for r in rows) + "\n").encode("iso-8859-1", "replace"))
        if oracle(text):
            frame = _raw.read_dat(path, names, names, "iso-8859-1")
            assert frame[names[column]].tolist()[line] == int(text)
            assert frame.dtypes.map(str).tolist() == ["int64"] * 4
        else:
            with pytest.raises(_raw.RawFormatError, match=rf"ratings\.dat, line {line + 1}: field '{names[column]}'"):
                _raw.read_dat(path, names, names, "iso-8859-1")


@given(field_texts, st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=3))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_taobao_click_log_is_the_oracle(text: str, column: int, line: int) -> None:
    names = ["user_id", "item_id", "theme_id"]
    rows = [[str(10 + k), str(100 + k), "900", "2018-09-01 12:00:00"] for k in range(4)]
    rows[line][column] = text
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "theme_click_log.csv"
        path.write_text("user_id,item_id,theme_id,reach_time\n" + "\n".join(",".join(r) for r in rows) + "\n",
                        encoding="utf-8")
        if oracle(text):
            frame = taobao._read_clicks(path)
            assert frame[names[column]].tolist()[line] == int(text)
        else:
            with pytest.raises(_raw.RawFormatError,
                               match=rf"theme_click_log\.csv, line {line + 2}: field '{names[column]}'"):
                taobao._read_clicks(path)


# -- the loaders, end to end: one ValueError naming the file and the line, never a traceback --


@pytest.mark.parametrize("value", ["1e1", "4.9999999999999999", "1_0", " 5", "+5", "0x5", "5.0",
                                   "99999999999999999999"])
def test_movielens_ratings_refuses_what_is_not_an_integer(tmp_path: Path, value: str) -> None:
    # MovieLens' README: whole-star ratings 1-5, ids and timestamps integers.
    ratings = movielens_files._ratings()
    user, movie, _, stamp = ratings[3].split("::")
    ratings[3] = f"{user}::{movie}::{value}::{stamp}"
    raw = movielens_files._write(tmp_path / "raw", ratings=ratings)
    with pytest.raises(_raw.RawFormatError, match=r"ratings\.dat, line 4: field 'Rating': .*" + re.escape(repr(value))):
        moefast.data.load("movielens-1m", raw_dir=raw, cache_dir=tmp_path / "c")


def test_movielens_users_and_movies_use_the_same_grammar(tmp_path: Path) -> None:
    users = [*movielens_files.USERS[:2], "3::M::+25::15::55117", *movielens_files.USERS[3:]]
    raw = movielens_files._write(tmp_path / "raw", users=users)
    with pytest.raises(_raw.RawFormatError, match=r"users\.dat, line 3: field 'Age': not an integer"):
        moefast.data.load("movielens-1m", raw_dir=raw, cache_dir=tmp_path / "c")
    movies = [*movielens_files.MOVIES[:3], "1_1::Crêpes (1934)::Drama"]
    raw = movielens_files._write(tmp_path / "raw2", movies=movies)
    with pytest.raises(_raw.RawFormatError, match=r"movies\.dat, line 4: field 'MovieID': not an integer"):
        moefast.data.load("movielens-1m", raw_dir=raw, cache_dir=tmp_path / "c")


def test_movielens_titles_split_at_newlines_only(tmp_path: Path) -> None:
    # \x85 (NEL) and \x1c are ISO-8859-1 characters; str.splitlines() would cut the title there.
    movies = [*movielens_files.MOVIES[:3], "11::Crêpes\x85 Stars\x1c (1934)::Drama"]
    raw = movielens_files._write(tmp_path / "raw", movies=movies)
    ds = moefast.data.load("movielens-1m", raw_dir=raw, cache_dir=tmp_path / "c")
    assert ds.info["item_names"][3] == "Crêpes\x85 Stars\x1c (1934)"  # type: ignore[index]


@pytest.mark.parametrize(("row", "message"), [
    ("10,99999999999999999999,900,t", r"line 4: field 'item_id': integer too large for int64"),
    ("10,+5,900,t", r"line 4: field 'item_id': not an integer"),
    ("10, 101,900,t", r"line 4: field 'item_id': not an integer"),
    ("10,101,9e2,t", r"line 4: field 'theme_id': not an integer"),
    ("10,101,,t", r"line 4: field 'theme_id': empty"),
])
def test_taobao_log_bad_integers(tmp_path: Path, row: str, message: str) -> None:
    rows = [f"{u},{i},{t},t" for u, i, t in taobao_files.CLICKS]
    rows[2] = row
    raw = taobao_files._write_log(tmp_path / "raw", rows)
    with pytest.raises(_raw.RawFormatError, match=r"theme_click_log\.csv, " + message):
        moefast.data.load("taobao", raw_dir=raw, num_themes=1, cache_dir=tmp_path / "c")


def test_taobao_latin1_bytes_name_the_line(tmp_path: Path) -> None:
    raw = taobao_files._write_log(tmp_path / "raw")
    log = raw / "theme_click_log.csv"
    lines = log.read_bytes().split(b"\n")
    lines[5] = lines[5] + "caf\xe9".encode("latin-1")
    log.write_bytes(b"\n".join(lines))
    with pytest.raises(_raw.RawFormatError, match=r"theme_click_log\.csv, line 6: not utf-8 text: byte 0xe9"):
        moefast.data.load("taobao", raw_dir=raw, num_themes=1, cache_dir=tmp_path / "c")


def test_check_text_counts_lines_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A two-byte character cut by the chunk boundary is fine; the bad byte's line is exact.
    monkeypatch.setattr(_raw, "_TEXT_CHUNK", 7)
    path = tmp_path / "t.csv"
    path.write_bytes("ab\ncé\néé\nx".encode() + b"\xff\n")
    with pytest.raises(_raw.RawFormatError, match=r"t\.csv, line 4: not utf-8 text: byte 0xff at byte 2 "):
        _raw.check_text(path, "utf-8")
    # A line longer than a chunk, and a bad byte on the first line: columns count from the line.
    path.write_bytes("ééé abcdefgh é".encode() + b"\xe9!\nok\n")
    with pytest.raises(_raw.RawFormatError, match=r"line 1: not utf-8 text: byte 0xe9 at byte 19 "):
        _raw.check_text(path, "utf-8")
    path.write_bytes(b"ab\n" + "ééé abcdefgh é".encode() + b"\xe9!\n")
    with pytest.raises(_raw.RawFormatError, match=r"line 2: not utf-8 text: byte 0xe9 at byte 19 "):
        _raw.check_text(path, "utf-8")
    path.write_bytes("ab\ncé\néé\nx\n".encode())
    _raw.check_text(path, "utf-8")


@pytest.mark.parametrize(("name", "body", "message"), [
    ("user_embedding.csv", 'user_id,emb\n+10,"1 2"\n', r"user_embedding\.csv, line 2: field 'user_id': not an integer"),
    ("user_embedding.csv", 'user_id,emb\n10,"1 nan"\n', r"user_embedding\.csv, line 2: field 'emb': a vector holding NaN"),
    ("item_embedding.csv", b'item_id,emb\n100,"1 2"\n101,"1 \xb2"\n', r"item_embedding\.csv, line 3: not utf-8"),
])
def test_taobao_embedding_files(tmp_path: Path, name: str, body: str | bytes, message: str) -> None:
    raw = taobao_files._write_log(tmp_path / "raw")
    (raw / "user_embedding.csv").write_text('user_id,emb\n10,"1 2"\n')
    (raw / "item_embedding.csv").write_text('item_id,emb\n100,"1 2"\n')
    (raw / name).write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(_raw.RawFormatError, match=message):
        moefast.data.load("taobao", raw_dir=raw, num_themes=1, cache_dir=tmp_path / "c")


def _amazon_with(tmp_path: Path, data: bytes, name: str = "Digital_Music_5.json.gz") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = amazon_files._write(tmp_path / "raw")
    (raw / amazon_files.FILES["Digital_Music"]).unlink()
    (raw / name).write_bytes(data)
    return raw


def test_amazon_truncated_or_corrupt_gzip(tmp_path: Path) -> None:
    lines = [amazon_files._line(f"U{k}", f"B{k % 7}") for k in range(2000)]
    whole = gzip.compress(("\n".join(lines) + "\n").encode())
    for k, data in enumerate([whole[: len(whole) // 2], whole[:-9], b"\x1f\x8b" + b"\x00" * 40,
                              whole[:30] + b"\xff" * 50 + whole[80:]]):
        raw = _amazon_with(tmp_path / str(k), data)
        with pytest.raises(_raw.RawFormatError,
                           match=r"Digital_Music_5\.json\.gz, line \d+: cannot be read from here on: truncated or corrupt gzip"):
            moefast.data.load("amazon-6", raw_dir=raw, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("name", ["Digital_Music_5.json.gz", "Digital_Music_5.json"])
def test_amazon_latin1_bytes_name_the_line(tmp_path: Path, name: str) -> None:
    text = amazon_files._line("U1", "B1") + "\n" + amazon_files._line("U2", "B2").replace("Tr", "Tr\xe8") + "\n"
    data = text.encode("latin-1", "replace")
    raw = _amazon_with(tmp_path, gzip.compress(data) if name.endswith(".gz") else data, name)
    with pytest.raises(_raw.RawFormatError, match=re.escape(name) + r", line 2: not utf-8 text: byte 0xe8"):
        moefast.data.load("amazon-6", raw_dir=raw, cache_dir=tmp_path / "c")
