"""MovieLens-1M from its raw files: ``users.dat``, ``ratings.dat``, ``movies.dat``.

Raw formats (the GroupLens ML-1M README), one record per line, fields separated by ``::``:

- ``users.dat``: ``UserID::Gender::Age::Occupation::Zip-code``; Gender ``F``/``M``; Age one of
  1, 18, 25, 35, 45, 50, 56; Occupation 0..20.
- ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, Rating 1..5.
- ``movies.dat``: ``MovieID::Title::Genres``, encoded ISO-8859-1 (not UTF-8: some titles hold
  accented letters).

Output (the seeds' setting): features ``uid``, ``item`` (the movie) and ``domain``, all
single-valued with contiguous ids in sorted raw-id order; label 1 iff Rating == 5 (no negative
sampling); the domain is the user's gender (2 domains), age group (7, in the order 1, 18, 25, 35,
45, 50, 56) or occupation (21). Every rating must name a user of ``users.dat`` and a movie of
``movies.dat``, and every domain must hold ratings; otherwise a ``ValueError`` names the file,
line and field.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from moefast.config import FeatureSpec
from moefast.data import cache
from moefast.data._raw import RawFormatError, need_dir, need_file, read_dat
from moefast.data.dataset import MultiDomainDataset
from moefast.data.splits import SPLIT_SEED, make_splits

__all__ = ["DOMAINS", "load_movielens"]

_AGES = (1, 18, 25, 35, 45, 50, 56)
_OCCUPATIONS = (
    "other or not specified", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care", "executive/managerial",
    "farmer", "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed",
    "writer",
)
# domain option -> (users.dat field, raw values in domain order, domain names)
DOMAINS: dict[str, tuple[str, tuple[object, ...], tuple[str, ...]]] = {
    "gender": ("Gender", ("F", "M"), ("F", "M")),
    "age": ("Age", _AGES, ("Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")),
    "occupation": ("Occupation", tuple(range(21)), _OCCUPATIONS),
}
_ENCODING = "iso-8859-1"


def _first_bad(path: Path, mask: np.ndarray, field: str, values: np.ndarray, problem: str) -> None:
    bad = np.flatnonzero(mask)
    if bad.size:
        raise RawFormatError(path, int(bad[0]) + 1, field, f"{problem}: {values[bad[0]]!r}")


def _build(raw_dir: Path, domain: str, embedding_dim: int, split_seed: int) -> MultiDomainDataset:
    field, values, names = DOMAINS[domain]
    users_path, ratings_path, movies_path = (raw_dir / n for n in ("users.dat", "ratings.dat", "movies.dat"))
    users = read_dat(users_path, ["UserID", "Gender", "Age", "Occupation", "Zip-code"],
                     ["UserID", "Age", "Occupation"], _ENCODING)
    movies = read_dat(movies_path, ["MovieID", "Title", "Genres"], ["MovieID"], _ENCODING)
    ratings = read_dat(ratings_path, ["UserID", "MovieID", "Rating", "Timestamp"],
                       ["UserID", "MovieID", "Rating", "Timestamp"], _ENCODING)

    for frame, path, key in ((users, users_path, "UserID"), (movies, movies_path, "MovieID")):
        ids = frame[key].to_numpy()
        _first_bad(path, pd.Series(ids).duplicated().to_numpy(), key, ids, "duplicate id")
    for name, allowed in (("Gender", ("F", "M")), ("Age", _AGES), ("Occupation", tuple(range(21)))):
        col = users[name].to_numpy()
        _first_bad(users_path, ~np.isin(col, np.array(allowed, dtype=col.dtype)), name, col,
                   f"unknown value (expected one of {list(allowed)})")

    rating = ratings["Rating"].to_numpy()
    _first_bad(ratings_path, (rating < 1) | (rating > 5), "Rating", rating, "outside 1..5")
    user_ids = np.sort(users["UserID"].to_numpy())
    movie_ids = np.sort(movies["MovieID"].to_numpy())
    r_user, r_movie = ratings["UserID"].to_numpy(), ratings["MovieID"].to_numpy()
    _first_bad(ratings_path, ~np.isin(r_user, user_ids), "UserID", r_user, "user not in users.dat")
    _first_bad(ratings_path, ~np.isin(r_movie, movie_ids), "MovieID", r_movie, "movie not in movies.dat")

    uid = np.searchsorted(user_ids, r_user)
    item = np.searchsorted(movie_ids, r_movie)
    # The user's domain value, looked up through the users table in sorted-id order.
    by_id = users.set_index("UserID").loc[user_ids, field].to_numpy()
    position = {v: k for k, v in enumerate(values)}
    code = np.array([position[v] for v in by_id.tolist()], dtype=np.int64)
    dom = code[uid]
    counts = np.bincount(dom, minlength=len(values))
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise RawFormatError(ratings_path, None, field, f"no ratings in domain {names[empty]!r} ({field} = {values[empty]})")
    label = (rating == 5).astype(np.float32)
    train, val, test = make_splits({"uid": uid, "item": item, "domain": dom}, dom, label, seed=split_seed)
    return MultiDomainDataset(
        name=f"movielens-1m-{domain}",
        features=(FeatureSpec("uid", int(user_ids.size), embedding_dim),
                  FeatureSpec("item", int(movie_ids.size), embedding_dim),
                  FeatureSpec("domain", len(values), embedding_dim)),
        domain_names=names,
        train=train, val=val, test=test,
        info={"source": "movielens-1m", "raw_dir": str(raw_dir), "domain": domain,
              "domain_rows": counts.tolist(), "split_seed": split_seed,
              "item_names": movies.set_index("MovieID").loc[movie_ids, "Title"].tolist()},
    )


def load_movielens(
    raw_dir: str | os.PathLike[str] | None = None,
    *,
    domain: str = "gender",
    embedding_dim: int = 8,
    split_seed: int = SPLIT_SEED,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MultiDomainDataset:
    """MovieLens-1M from ``raw_dir`` (``users.dat``, ``ratings.dat``, ``movies.dat``), cached.

    Args:
        domain: ``"gender"`` (2 domains), ``"age"`` (7) or ``"occupation"`` (21).
        embedding_dim: the dim of every feature spec (8 in the seeds).
        split_seed: seed of the per-domain stratified 60/20/20 split.
        cache_dir: where the processed dataset is cached (see :mod:`moefast.data.cache`).
    """
    source = "movielens-1m"
    if domain not in DOMAINS:
        raise ValueError(f"unknown MovieLens domain {domain!r}; choose one of {sorted(DOMAINS)}")
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    root = need_dir(raw_dir, source)
    files = [need_file(root, n, source) for n in ("users.dat", "ratings.dat", "movies.dat")]
    options = {"domain": domain, "embedding_dim": embedding_dim, "split_seed": split_seed}
    return cache.cached(source, files, options, lambda: _build(root, domain, embedding_dim, split_seed), cache_dir)
