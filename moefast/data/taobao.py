"""Taobao-N from the Taobao theme click log (Tianchi dataset 9716), given its raw CSV files.

Raw format (comma-separated, header line first):

- ``theme_click_log.csv`` (required): columns ``user_id``, ``item_id``, ``theme_id`` (integers)
  and ``reach_time`` (text); other columns are ignored. Every row is a click (a positive).
- ``user_embedding.csv`` and ``item_embedding.csv`` (optional, both or neither): a header, then
  the id in the first column and its pretrained vector either in one text column (numbers
  separated by spaces or commas, e.g. ``"0.12 -0.5 ..."``) or spread over the remaining numeric
  columns. When present, clicks of users or items without a vector are dropped (as in the seeds'
  code), every feature gets the vectors' dim, and ``dataset.pretrained`` holds the tables
  (``float32 [vocab, dim]`` per ``uid`` / ``item``, rows in id order) for frozen embeddings.
- ``theme_item_pool.csv`` and ``user_item_purchase_log.csv`` are not used.

Processing (DESIGN.md section 2, the seeds' rules): exact duplicate rows are dropped; the domain
is the theme, themes numbered by first appearance in the log; Taobao-N keeps the first N themes;
negatives come from :mod:`moefast.data.negatives` (per theme ``ctr_ratio ~ U(0.2, 0.5)``, per user
``int(n_pos / ctr_ratio)`` items of the theme's clicked-item pool that the user did not click);
then the per-domain stratified 60/20/20 split. The seeds split positives by ``reach_time``
instead; moefast uses the stratified split for every source (a documented deviation).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from moefast.data import cache
from moefast.data._clicks import clicks_to_dataset
from moefast.data._raw import (
    BadInteger,
    RawFormatError,
    check_text,
    int_problem,
    need_dir,
    need_file,
    parse_int_column,
)
from moefast.data.dataset import MultiDomainDataset
from moefast.data.splits import SPLIT_SEED

__all__ = ["load_taobao"]

_COLUMNS = ("user_id", "item_id", "theme_id", "reach_time")
_INT_COLUMNS = ("user_id", "item_id", "theme_id")
_EMBEDDING_FILES = ("user_embedding.csv", "item_embedding.csv")


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        first = next(csv.reader(f), None)
    if first is None:
        raise RawFormatError(path, 1, None, "empty file (expected a header line)")
    return [c.strip() for c in first]


def _locate_bad_row(path: Path, header: list[str], int_columns: tuple[str, ...]) -> None:
    """Scan the CSV and raise at the first row with a wrong field count or a non-integer id
    (:func:`~moefast.data._raw.int_problem`'s grammar); the line is the file's, so a quoted
    field spanning lines does not shift it."""
    positions = [header.index(c) for c in int_columns]
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            number = reader.line_num
            if not row:
                raise RawFormatError(path, number, None, "empty line")
            if len(row) != len(header):
                raise RawFormatError(path, number, None, f"expected {len(header)} fields {header}, got {len(row)}")
            for col, pos in zip(int_columns, positions, strict=True):
                problem = int_problem(row[pos])
                if problem is not None:
                    raise RawFormatError(path, number, col, f"{problem}: {row[pos]!r}")


def _int_columns(path: Path, header: list[str], columns: dict[str, object]) -> dict[str, np.ndarray]:
    """The text ``columns`` (name -> values) parsed under the strict integer grammar; on a bad
    value, the file is rescanned so that the error names its line."""
    parsed = {}
    for col, values in columns.items():
        try:
            parsed[col] = parse_int_column(values)  # type: ignore[arg-type]
        except BadInteger as e:
            _locate_bad_row(path, header, tuple(columns))
            raise RawFormatError(path, None, col, str(e)) from None
    return parsed


def _read_clicks(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    check_text(path, "utf-8")
    header = _header(path)
    for col in _COLUMNS:
        if col not in header:
            raise RawFormatError(path, 1, col, f"missing column (header is {header})")
    # Every column as text, the ids parsed strictly below. Arrow refuses a row with a missing
    # or extra field; the line scan then names the line.
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),  # as the csv module reads them
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 include_columns=list(_COLUMNS), strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        _locate_bad_row(path, header, _INT_COLUMNS)
        raise RawFormatError(path, None, None, str(e).splitlines()[0]) from None
    ids = _int_columns(path, header, {c: table.column(c) for c in _INT_COLUMNS})
    reach = table.column("reach_time").to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(reach == "")
    if empty.size:
        raise RawFormatError(path, int(empty[0]) + 2, "reach_time", "empty")
    return pd.DataFrame({**ids, "reach_time": reach})


def _read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int64 [V], vectors float32 [V, dim])`` from an embedding CSV (formats above)."""
    check_text(path, "utf-8")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, engine="c")
    if frame.shape[1] < 2:
        raise RawFormatError(path, 1, None, "expected an id column and a vector (one text column or several numbers)")
    id_col = str(frame.columns[0])
    ids = _int_columns(path, [str(c) for c in frame.columns], {id_col: frame[id_col]})[id_col]
    if frame.shape[1] == 2:
        text = frame.iloc[:, 1].str.replace(",", " ", regex=False)
        rows = text.str.split()
        dims = rows.str.len().to_numpy()
    else:
        rows = None
        dims = np.full(len(frame), frame.shape[1] - 1)
    if len(frame) == 0:
        raise RawFormatError(path, None, None, "no vectors")
    bad = np.flatnonzero(dims != dims[0])
    if bad.size:
        raise RawFormatError(path, int(bad[0]) + 2, str(frame.columns[-1]),
                             f"vector of {dims[bad[0]]} numbers, expected {dims[0]} like line 2")
    try:
        if rows is None:
            vectors = frame.iloc[:, 1:].to_numpy(dtype=np.float32)
        else:
            vectors = np.loadtxt(io.StringIO("\n".join(text)), dtype=np.float32, ndmin=2)
    except ValueError:
        for number, value in enumerate(frame.iloc[:, 1:].itertuples(index=False), 2):
            try:
                np.array([float(x) for x in " ".join(value).replace(",", " ").split()])
            except ValueError:
                raise RawFormatError(path, number, str(frame.columns[1]), f"not numbers: {value!r}") from None
        raise
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise RawFormatError(path, row + 2, str(frame.columns[-1]), "a vector holding NaN or infinity")
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        raise RawFormatError(path, int(np.flatnonzero(dup)[0]) + 2, str(id_col), "duplicate id")
    return ids, vectors


def _build(root: Path, num_themes: int, embedding_dim: int | None, negative_seed: int,
           split_seed: int, with_embeddings: bool) -> MultiDomainDataset:
    log_path = root / "theme_click_log.csv"
    clicks = _read_clicks(log_path).drop_duplicates()
    pretrained = None
    if with_embeddings:
        users = _read_embeddings(root / _EMBEDDING_FILES[0])
        items = _read_embeddings(root / _EMBEDDING_FILES[1])
        if users[1].shape[1] != items[1].shape[1]:
            raise ValueError(f"user vectors have dim {users[1].shape[1]} but item vectors {items[1].shape[1]} "
                             f"({root / _EMBEDDING_FILES[0]}, {root / _EMBEDDING_FILES[1]})")
        pretrained = {"uid": users, "item": items}
        clicks = clicks[clicks["user_id"].isin(users[0]) & clicks["item_id"].isin(items[0])]
        dim = users[1].shape[1]
        if embedding_dim is not None and embedding_dim != dim:
            raise ValueError(f"embedding_dim={embedding_dim} but the pretrained vectors have dim {dim}")
        embedding_dim = dim
    theme = clicks["theme_id"].to_numpy()
    # Themes by first appearance: pd.unique keeps order of first occurrence.
    order = pd.unique(theme)
    if order.size < num_themes:
        raise ValueError(f"{log_path}: num_themes={num_themes} but the log holds {order.size} theme(s) "
                         f"{'with embedded users and items' if with_embeddings else ''}".rstrip())
    kept = order[:num_themes]
    position = pd.Series(np.arange(num_themes), index=kept)
    clicks = clicks[clicks["theme_id"].isin(kept)]
    domain = position.loc[clicks["theme_id"].to_numpy()].to_numpy().astype(np.int64)
    return clicks_to_dataset(
        f"taobao-{num_themes}",
        clicks["user_id"].to_numpy(), clicks["item_id"].to_numpy(), domain,
        tuple(str(t) for t in kept.tolist()),
        embedding_dim=128 if embedding_dim is None else embedding_dim,
        negative_seed=negative_seed, split_seed=split_seed,
        info={"source": "taobao", "raw_dir": str(root), "num_themes": num_themes,
              "theme_ids": kept.tolist(), "pretrained_embeddings": with_embeddings},
        pretrained=pretrained,
    )


def load_taobao(
    raw_dir: str | os.PathLike[str] | None = None,
    *,
    num_themes: int = 10,
    embedding_dim: int | None = None,
    negative_seed: int = 123,
    split_seed: int = SPLIT_SEED,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MultiDomainDataset:
    """Taobao-``num_themes`` from ``raw_dir`` (see the module docstring for the files), cached.

    Args:
        num_themes: keep the first N themes (10, 20 or 30 in the seeds).
        embedding_dim: the dim of every feature; ``None`` means the pretrained vectors' dim, or
            128 (the seeds') without them. Must match the vectors when they are present.
        negative_seed: seed of the ``ctr_ratio`` draws and the negative sampling.
        split_seed: seed of the per-domain stratified 60/20/20 split.
    """
    source = "taobao"
    if not isinstance(num_themes, int) or isinstance(num_themes, bool) or num_themes < 1:
        raise ValueError(f"num_themes must be a positive int, got {num_themes!r}")
    if embedding_dim is not None and (not isinstance(embedding_dim, int) or embedding_dim < 1):
        raise ValueError(f"embedding_dim must be a positive int or None, got {embedding_dim!r}")
    root = need_dir(raw_dir, source)
    files = [need_file(root, "theme_click_log.csv", source)]
    present = [(root / n).is_file() for n in _EMBEDDING_FILES]
    if any(present) and not all(present):
        missing = _EMBEDDING_FILES[present.index(False)]
        raise ValueError(f"dataset 'taobao': {root / missing} is missing (give both embedding files or neither)")
    with_embeddings = all(present)
    if with_embeddings:
        files += [root / n for n in _EMBEDDING_FILES]
    options = {"num_themes": num_themes, "embedding_dim": embedding_dim, "negative_seed": negative_seed,
               "split_seed": split_seed}
    return cache.cached(
        source, files, options,
        lambda: _build(root, num_themes, embedding_dim, negative_seed, split_seed, with_embeddings),
        cache_dir,
    )
