"""The processed-dataset cache: round trip, fingerprint, atomic write, location."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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


def test_location_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.resolve_cache_dir() == tmp_path / "env"
    assert cache.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.resolve_cache_dir() == Path.home() / ".cache" / "moefast"
