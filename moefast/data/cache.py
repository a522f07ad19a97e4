"""The processed-dataset cache: one ``.npz`` per (source files, options) fingerprint.

The key is a SHA-256 over the cache format version, the source name, the options (as sorted
JSON) and, for every raw input file, its name and the SHA-256 of its *content*: editing,
replacing or truncating a raw file changes the key, while moving the directory does not. A hit
loads the arrays and skips parsing, negative sampling and splitting. Files are written to a
temporary name and renamed, so a crash never leaves a half-written entry that a later run
would trust.

Every entry carries a SHA-256 of its own content (every array's name, dtype, shape and bytes,
the metadata included) under ``digest``; a read recomputes it. An entry that is truncated,
corrupt, or whose content was altered is never trusted: :func:`read` raises
:class:`CacheEntryError`, and :func:`cached` warns once (naming the file and what is wrong) and
rebuilds it.

Location: the ``cache_dir`` argument, else ``$MOEFAST_CACHE``, else ``~/.cache/moefast``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from moefast.config import FeatureSpec, NumericSpec, Pooling
from moefast.data.dataset import MultiDomainDataset, Split
from moefast.runs.writer import WriteError, save_npz

__all__ = ["CACHE_ENV", "FORMAT_VERSION", "CacheEntryError", "cached", "fingerprint", "read", "resolve_cache_dir", "write"]

CACHE_ENV = "MOEFAST_CACHE"
# Bump when a loader's output for the same inputs changes, so stale entries are never reused.
# 2: pretrained tables are their own arrays, not in info; 3: a content digest in every entry;
# 4: numeric fields (meta["numeric"], float32 columns beside the categorical ones)
FORMAT_VERSION = 4
_SPLITS = ("train", "val", "test")
_DIGEST = "digest"


class CacheEntryError(ValueError):
    """A cache entry is truncated, corrupt, or its content does not match its digest."""


def _content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode() + b"\0")
        h.update(array.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$MOEFAST_CACHE``, else ``~/.cache/moefast``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "moefast"


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(source: str, files: Sequence[Path], options: Mapping[str, object]) -> str:
    """Hex key (24 chars) of a source, its raw files' names and contents, and its options."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, source, dict(options)], sort_keys=True, default=str).encode())
    for path in sorted(files, key=lambda p: p.name):
        h.update(f"\0{path.name}\0{_file_digest(path)}".encode())
    return h.hexdigest()[:24]


def _split_info(info: object, arrays: dict[str, np.ndarray], prefix: str) -> object:
    """Info as JSON, with tensors moved into ``arrays`` under ``info/<path>``."""
    if isinstance(info, torch.Tensor):
        key = f"info/{prefix}"
        arrays[key] = info.numpy()
        return {"__tensor__": key}
    if isinstance(info, Mapping):
        return {str(k): _split_info(v, arrays, f"{prefix}/{k}") for k, v in info.items()}
    if isinstance(info, list | tuple):
        return [_split_info(v, arrays, f"{prefix}/{i}") for i, v in enumerate(info)]
    return info


def _join_info(info: object, arrays: Mapping[str, np.ndarray]) -> object:
    if isinstance(info, dict):
        if set(info) == {"__tensor__"}:
            return torch.from_numpy(arrays[info["__tensor__"]])
        return {k: _join_info(v, arrays) for k, v in info.items()}
    if isinstance(info, list):
        return [_join_info(v, arrays) for v in info]
    return info


def write(path: Path, dataset: MultiDomainDataset) -> None:
    """Write ``dataset`` to ``path`` (an ``.npz``) by the one writer (:func:`moefast.runs.writer.save_npz`)."""
    arrays: dict[str, np.ndarray] = {}
    for split_name in _SPLITS:
        split: Split = getattr(dataset, split_name)
        arrays[f"{split_name}/domain"] = split.domain.numpy()
        arrays[f"{split_name}/label"] = split.label.numpy()
        for name, col in split.features.items():
            arrays[f"{split_name}/features/{name}"] = col.numpy()
    for name, table in dataset.pretrained.items():
        arrays[f"pretrained/{name}"] = table.numpy()
    meta = {
        "name": dataset.name,
        "pretrained": sorted(dataset.pretrained),
        "features": [[f.name, f.vocab_size, f.dim, f.pooling.value] for f in dataset.features],
        "numeric": [s.name for s in dataset.numeric],
        "domain_names": list(dataset.domain_names),
        "info": _split_info(dict(dataset.info), arrays, ""),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays[_DIGEST] = np.frombuffer(_content_digest(arrays).encode(), dtype=np.uint8)
    save_npz(path, arrays)


def read(path: Path) -> MultiDomainDataset:
    """Load a dataset written by :func:`write`.

    Raises:
        CacheEntryError: naming ``path``: it is not a readable ``.npz`` (truncated, corrupt),
            it has no digest, or its content does not match the digest it carries.
    """
    try:
        return _read(path)
    except CacheEntryError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as exc:
        # np.load and zipfile raise any of these for a damaged file (BadZipFile for a bad CRC).
        detail = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {detail[0]}" if detail else type(exc).__name__
        raise CacheEntryError(f"cache entry {str(path)!r} is unreadable ({reason})") from None


def _read(path: Path) -> MultiDomainDataset:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if _DIGEST not in arrays:
        raise CacheEntryError(f"cache entry {str(path)!r} carries no content digest")
    stored = arrays.pop(_DIGEST).tobytes().decode("ascii", errors="replace")
    if _content_digest(arrays) != stored:
        raise CacheEntryError(f"cache entry {str(path)!r} does not match its content digest (altered)")
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    features = tuple(FeatureSpec(n, v, d, Pooling(p)) for n, v, d, p in meta["features"])
    numeric = tuple(NumericSpec(n) for n in meta.get("numeric", []))
    columns = [f.name for f in features] + [s.name for s in numeric]
    splits = {}
    for split_name in _SPLITS:
        splits[split_name] = Split(
            {c: torch.from_numpy(arrays[f"{split_name}/features/{c}"]) for c in columns},
            torch.from_numpy(arrays[f"{split_name}/domain"]),
            torch.from_numpy(arrays[f"{split_name}/label"]),
        )
    info = _join_info(meta["info"], arrays)
    if not isinstance(info, dict):
        raise CacheEntryError(f"cache entry {str(path)!r} has a malformed info record")
    pretrained = {name: torch.from_numpy(arrays[f"pretrained/{name}"]) for name in meta.get("pretrained", [])}
    return MultiDomainDataset(
        name=meta["name"],
        features=features,
        domain_names=tuple(meta["domain_names"]),
        info=info,
        pretrained=pretrained,
        numeric=numeric,
        **splits,
    )


def cached(
    source: str,
    files: Sequence[Path],
    options: Mapping[str, object],
    build: Callable[[], MultiDomainDataset],
    cache_dir: str | os.PathLike[str] | None = None,
) -> MultiDomainDataset:
    """Return the cached dataset for this fingerprint, or ``build()`` it and cache the result.

    A damaged or altered entry (:class:`CacheEntryError`) is reported with one warning and
    rebuilt; an entry that cannot be written (a full disk, a read-only folder) is one warning too,
    and the dataset is returned uncached.

    ``info["cache"]`` tells which happened: ``{"key", "path", "hit"}``.
    """
    key = fingerprint(source, files, options)
    path = resolve_cache_dir(cache_dir) / f"{source}-{key}.npz"
    hit = path.exists()
    if hit:
        try:
            dataset = read(path)
        except CacheEntryError as exc:
            # Never trusted, never a traceback: said once, then rebuilt over the bad entry.
            warnings.warn(f"{exc}; rebuilding it", stacklevel=2)
            hit = False
    if not hit:
        dataset = build()
        try:
            write(path, dataset)
        except WriteError as exc:
            # The cache only saves time: a full disk or a read-only cache folder costs the next
            # load a rebuild, not this run.
            warnings.warn(f"cannot write the cache entry {str(path)!r} ({exc.reason}); continuing "
                          "without it", stacklevel=2)
    info = dict(dataset.info)
    info["cache"] = {"key": key, "path": str(path), "hit": hit}
    return MultiDomainDataset(
        name=dataset.name,
        features=dataset.features,
        domain_names=dataset.domain_names,
        train=dataset.train,
        val=dataset.val,
        test=dataset.test,
        info=info,
        pretrained=dataset.pretrained,
        numeric=dataset.numeric,
    )
