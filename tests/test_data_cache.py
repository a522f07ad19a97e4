"""The processed-dataset cache: round trip, fingerprint, atomic write, location."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import moefast
from moefast.data import cache


def _small() -> moefast.data.MultiDomainDataset:
    ds = moefast.data.load("synthetic", preset="wide", rows=500, num_users=1_000, num_items=1_000,
                           context_fields=2, context_vocab_max=1_000, multi_fields=1)
    info = dict(ds.info, pretrained={"uid": torch.randn(3, 4)}, names=["a", "b"])
    return dataclasses.replace(ds, info=info)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    ds = _small()
    path = tmp_path / "x.npz"
    cache.write(path, ds)
    back = cache.read(path)
    assert back.name == ds.name and back.features == ds.features and back.domain_names == ds.domain_names
    for s in ("train", "val", "test"):
        a, b = getattr(ds, s), getattr(back, s)
        assert torch.equal(a.domain, b.domain) and torch.equal(a.label, b.label)
        assert all(torch.equal(a.features[k], b.features[k]) for k in a.features)
    assert torch.equal(back.info["pretrained"]["uid"], ds.info["pretrained"]["uid"])  # type: ignore[index]
    assert back.info["names"] == ["a", "b"] and back.info["config"] == ds.info["config"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]  # no temporary file left behind


def test_fingerprint_follows_content_and_options_not_location(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f.dat").write_text("1::2\n")
    (b / "f.dat").write_text("1::2\n")
    key = cache.fingerprint("src", [a / "f.dat"], {"k": 1})
    assert cache.fingerprint("src", [b / "f.dat"], {"k": 1}) == key
    assert cache.fingerprint("src", [a / "f.dat"], {"k": 2}) != key
    assert cache.fingerprint("other", [a / "f.dat"], {"k": 1}) != key
    (a / "f.dat").write_text("1::3\n")
    assert cache.fingerprint("src", [a / "f.dat"], {"k": 1}) != key


def test_cached_builds_once_then_hits(tmp_path: Path) -> None:
    (tmp_path / "raw.txt").write_text("x")
    calls = []

    def build() -> moefast.data.MultiDomainDataset:
        calls.append(1)
        return _small()

    first = cache.cached("src", [tmp_path / "raw.txt"], {}, build, tmp_path / "c")
    second = cache.cached("src", [tmp_path / "raw.txt"], {}, build, tmp_path / "c")
    assert len(calls) == 1
    assert first.info["cache"]["hit"] is False and second.info["cache"]["hit"] is True  # type: ignore[index]
    assert torch.equal(first.test.label, second.test.label)


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cache.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.write(tmp_path / "x.npz", _small())
    assert list(tmp_path.iterdir()) == []


def test_an_entry_that_cannot_be_written_is_a_warning_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raw.txt").write_text("x")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "savez", full)
    with pytest.warns(UserWarning, match=r"cannot write the cache entry .*\(No space left on device\); continuing"):
        dataset = cache.cached("src", [tmp_path / "raw.txt"], {}, _small, tmp_path / "c")
    assert dataset.info["cache"]["hit"] is False and list((tmp_path / "c").iterdir()) == []  # type: ignore[index]


def test_location_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.resolve_cache_dir() == tmp_path / "env"
    assert cache.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.resolve_cache_dir() == Path.home() / ".cache" / "moefast"


def _entry(tmp_path: Path) -> tuple[Path, list[int], Callable[[], moefast.data.MultiDomainDataset]]:
    """A built and cached entry, the build counter, and a function that loads through the cache."""
    (tmp_path / "raw.txt").write_text("x")
    calls: list[int] = []
    small = _small()

    def build() -> moefast.data.MultiDomainDataset:
        calls.append(1)
        return small

    def load() -> moefast.data.MultiDomainDataset:
        return cache.cached("src", [tmp_path / "raw.txt"], {}, build, tmp_path / "c")

    first = load()
    return Path(first.info["cache"]["path"]), calls, load  # type: ignore[index]


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _altered(path: Path) -> None:
    # A well-formed .npz whose labels were edited (every CRC consistent): only the digest sees it.
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["test/label"] = 1 - arrays["test/label"]
    np.savez(path, **arrays)  # type: ignore[arg-type]


def _no_digest(path: Path) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "digest"}
    np.savez(path, **arrays)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip, _altered, _no_digest, lambda p: p.write_bytes(b""), lambda p: p.write_text("junk")],
    ids=["truncated", "byte-flipped", "altered", "no-digest", "empty", "junk"],
)
def test_a_damaged_or_altered_entry_warns_once_and_is_rebuilt(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    path, calls, load = _entry(tmp_path)
    expected = cache.read(path)
    damage(path)
    with pytest.raises(cache.CacheEntryError, match=str(path)):
        cache.read(path)
    with pytest.warns(UserWarning, match="rebuilding it") as caught:
        again = load()
    assert len([w for w in caught if "cache entry" in str(w.message)]) == 1
    assert len(calls) == 2 and again.info["cache"]["hit"] is False  # type: ignore[index]
    assert torch.equal(again.test.label, expected.test.label)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry is a clean hit: no second warning
        third = load()
    assert len(calls) == 2 and third.info["cache"]["hit"] is True  # type: ignore[index]
