"""Amazon-6 from the Amazon review data's 5-core files, one file per product category.

Raw format: the "5-core" review files of the Amazon review data (McAuley et al.; the 2018
release names them ``<Category>_5.json.gz``, the 2014 release ``reviews_<Category>_5.json.gz``;
plain ``.json`` is accepted too). One JSON object per line; moefast reads ``reviewerID`` and
``asin`` (both strings) and ignores the other keys (``overall``, ``reviewText``, ...).

Processing (DESIGN.md section 2): the domain is the category (domain order = the ``categories``
option, else the categories sorted by name); every review is a positive, repeated
(reviewer, product) pairs within a category count once; negatives as for Taobao (per category
``ctr_ratio ~ U(0.2, 0.5)``, per user ``int(n_pos / ctr_ratio)`` products of the category that
the user did not review); then the per-domain stratified 60/20/20 split. Features ``uid``,
``item``, ``domain``, embedding dim 8.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from moefast.data import cache
from moefast.data._clicks import clicks_to_dataset
from moefast.data._raw import RawFormatError, need_dir
from moefast.data.dataset import MultiDomainDataset
from moefast.data.splits import SPLIT_SEED

__all__ = ["AMAZON_FILE", "find_category_files", "load_amazon"]

AMAZON_FILE = re.compile(r"^(?:reviews_)?(?P<category>.+)_5\.json(?:\.gz)?$")
NUM_CATEGORIES = 6


def find_category_files(raw_dir: Path) -> dict[str, Path]:
    """``{category: path}`` of the 5-core review files in ``raw_dir``."""
    found: dict[str, Path] = {}
    for path in sorted(raw_dir.iterdir()):
        match = AMAZON_FILE.match(path.name)
        if match and path.is_file():
            category = match.group("category")
            if category in found:
                raise ValueError(f"dataset 'amazon-6': two files for category {category!r}: "
                                 f"{found[category]} and {path}")
            found[category] = path
    return found


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a review file, gzipped or not.

    Bytes are decoded per line, so a byte that is not UTF-8 (a latin-1 export) names its line;
    a truncated or corrupt gzip stream names the line it cut, not a zlib or EOF traceback.
    """
    number = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
            for number, raw in enumerate(f, 1):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RawFormatError(path, number, None, f"not utf-8 text: byte {raw[e.start]:#04x} "
                                         f"at byte {e.start + 1} of the line ({e.reason})") from None
    except (EOFError, OSError, zlib.error) as e:
        what = "truncated or corrupt gzip data" if path.suffix == ".gz" else "read error"
        raise RawFormatError(path, number + 1, None, f"cannot be read from here on: {what} ({e})") from None


def _read_reviews(path: Path) -> tuple[list[str], list[str]]:
    users: list[str] = []
    items: list[str] = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            review = json.loads(line)
        except json.JSONDecodeError as e:
            raise RawFormatError(path, number, None, f"not a JSON object: {e.msg}") from None
        if not isinstance(review, dict):
            raise RawFormatError(path, number, None, "not a JSON object")
        for key, out in (("reviewerID", users), ("asin", items)):
            value = review.get(key)
            if not isinstance(value, str) or not value:
                raise RawFormatError(path, number, key, f"missing or not a non-empty string: {value!r}")
            out.append(value)
    if not users:
        raise RawFormatError(path, None, None, "no reviews (an empty domain)")
    return users, items


def _build(files: dict[str, Path], embedding_dim: int, negative_seed: int, split_seed: int) -> MultiDomainDataset:
    user_parts, item_parts, domain_parts = [], [], []
    for d, path in enumerate(files.values()):
        users, items = _read_reviews(path)
        pairs = pd.DataFrame({"user": users, "item": items}).drop_duplicates()
        user_parts.append(pairs["user"].to_numpy(dtype=str))
        item_parts.append(pairs["item"].to_numpy(dtype=str))
        domain_parts.append(np.full(len(pairs), d, dtype=np.int64))
    return clicks_to_dataset(
        "amazon-6" if len(files) == NUM_CATEGORIES else f"amazon-{len(files)}",
        np.concatenate(user_parts), np.concatenate(item_parts), np.concatenate(domain_parts),
        tuple(files),
        embedding_dim=embedding_dim, negative_seed=negative_seed, split_seed=split_seed,
        info={"source": "amazon", "files": [str(p) for p in files.values()]},
    )


def load_amazon(
    raw_dir: str | os.PathLike[str] | None = None,
    *,
    categories: Sequence[str] | None = None,
    embedding_dim: int = 8,
    negative_seed: int = 123,
    split_seed: int = SPLIT_SEED,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MultiDomainDataset:
    """Amazon-6 from the 5-core review files in ``raw_dir``, cached.

    Args:
        categories: the categories (file-name stems, e.g. ``"Video_Games"``) in domain order;
            ``None`` takes every 5-core file in ``raw_dir``, which must then hold exactly six.
        embedding_dim: the dim of every feature spec (8 in the seeds).
        negative_seed: seed of the ``ctr_ratio`` draws and the negative sampling.
        split_seed: seed of the per-domain stratified 60/20/20 split.
    """
    source = "amazon-6"
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    root = need_dir(raw_dir, source)
    found = find_category_files(root)
    if categories is None:
        if len(found) != NUM_CATEGORIES:
            raise ValueError(f"dataset 'amazon-6': {root} holds {len(found)} 5-core review file(s) "
                             f"{sorted(found)}; expected {NUM_CATEGORIES}, or pass categories=[...]")
        chosen = dict(sorted(found.items()))
    else:
        if isinstance(categories, str) or not categories:
            raise ValueError(f"categories must be a non-empty list of category names, got {categories!r}")
        missing = [c for c in categories if c not in found]
        if missing:
            raise ValueError(f"dataset 'amazon-6': no 5-core review file for {missing} in {root} "
                             f"(found {sorted(found)})")
        if len(set(categories)) != len(categories):
            raise ValueError(f"categories lists a category twice: {list(categories)}")
        chosen = {c: found[c] for c in categories}
    options = {"categories": list(chosen), "embedding_dim": embedding_dim, "negative_seed": negative_seed,
               "split_seed": split_seed}
    return cache.cached(source, list(chosen.values()), options,
                        lambda: _build(chosen, embedding_dim, negative_seed, split_seed), cache_dir)
