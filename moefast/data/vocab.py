"""Vocabularies, the stable hash, numeric statistics and the domain map of a tabular source.

Everything a later run needs to map raw values to the same ids lives in one JSON file,
``vocab.json``, at the top of the run directory (format in ``docs/data.md``). Ids of every
categorical field:

- ``0``: padding (multi-valued bags are padded with it; never pooled, never a value's id);
- ``1``: out-of-vocabulary: a value unseen in the training split, or seen fewer than
  ``min_count`` times there;
- ``2``: missing: an empty or null value (or ``1`` under ``missing = "oov"``; id 2 then stays
  unused);
- ``3 ..``: the vocabulary, most frequent training value first, ties in code-point order of the
  value's string; or, for a hashed field, ``3 + stable_hash(value, seed) mod buckets``.

The hash is BLAKE2b (RFC 7693) with an 8-byte digest, keyed by the seed as 8 little-endian
bytes, over the UTF-8 bytes of the value's text; the digest read as an unsigned little-endian
64-bit integer. Any language's BLAKE2b computes it: Python
``int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8, key=seed.to_bytes(8, "little")).digest(), "little")``.
A seed of 0 is an all-zero 8-byte key (not an empty key).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moefast.runs.files import DATA_REFERENCE, VOCAB
from moefast.runs.writer import read_json, write_text

__all__ = [
    "HASH_NAME",
    "MISSING_ID",
    "OOV_ID",
    "PADDING_ID",
    "RESERVED",
    "VOCAB_FILE",
    "hash_ids",
    "read_vocab",
    "stable_hash",
    "write_vocab",
]

PADDING_ID = 0
OOV_ID = 1
MISSING_ID = 2
RESERVED = 3
HASH_NAME = "blake2b-64-le, key = seed as 8 little-endian bytes, over the value's UTF-8 bytes"
VOCAB_FILE = VOCAB
FORMAT = "moefast-table-vocab"
VERSION = 1


def stable_hash(value: str, seed: int = 0) -> int:
    """The unsigned 64-bit hash of ``value``'s UTF-8 bytes under ``seed`` (see the module docstring)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"hash seed must be in [0, 2**64), got {seed}")
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


def hash_ids(values: Iterable[str], buckets: int, seed: int) -> np.ndarray:
    """``int64``: ``RESERVED + stable_hash(v, seed) % buckets`` for each value."""
    key = seed.to_bytes(8, "little")
    blake = hashlib.blake2b
    out = np.fromiter(
        (int.from_bytes(blake(v.encode("utf-8"), digest_size=8, key=key).digest(), "little") % buckets
         for v in values),
        dtype=np.int64,
    )
    return out + RESERVED


def write_vocab(path: str | os.PathLike[str], artifacts: Mapping[str, Any]) -> Path:
    """Write ``artifacts`` (the dict a table dataset carries in ``info["table"]``) as JSON.

    ``path`` is a run directory (the file is ``path/vocab.json``) or a ``.json`` file. Written by
    the one writer (:func:`moefast.runs.writer.write_text`: atomic, a full disk a ``WriteError``).
    """
    p = Path(path)
    if p.suffix != ".json":
        p = p / VOCAB_FILE
    try:
        # allow_nan=False: NaN and Infinity are not JSON, and services in other languages read this.
        text = json.dumps(dict(artifacts), ensure_ascii=False, sort_keys=True, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"{p}: not written: a statistic is not a finite number ({exc})") from None
    return write_text(p, text + "\n")


def read_vocab(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """``(artifacts, file)`` from a run directory, a method's subdirectory or a ``vocab.json``.

    A method subdirectory refers to its run's file through ``data.json`` (``{"vocab":
    "../vocab.json"}``); a directory without either is searched one level up. ``ValueError``
    naming the path when none is found or the file is not a moefast vocabulary.
    """
    p = Path(path)
    candidates = [p] if p.suffix == ".json" else []
    if p.is_dir():
        ref = p / DATA_REFERENCE
        if ref.is_file():
            target = read_json(ref, "data reference (JSON with a 'vocab' key)", expect=dict).get("vocab")
            if isinstance(target, str):
                candidates.append(p / target)
        candidates += [p / VOCAB_FILE, p.parent / VOCAB_FILE]
    for c in candidates:
        if c.is_file():
            data = read_json(c, "vocabulary file", allow_nan=False)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"{c}: not a moefast vocabulary file (format {FORMAT!r})")
            if data.get("version") != VERSION:
                raise ValueError(f"{c}: vocabulary format version {data.get('version')!r}, this moefast reads {VERSION}")
            return data, c.resolve()
    raise ValueError(f"vocab_from {str(p)!r}: no {VOCAB_FILE} there (a run directory of a table dataset)")
