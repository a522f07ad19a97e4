"""moefast.data: multi-domain datasets, generators, loaders and batching.

``load(name, **options)`` is the one entry point; see :func:`load` for the sources and their
options, :mod:`moefast.data.synthetic` for the generative model, :mod:`moefast.data.batching`
for the batch orders.

Owns: every source (synthetic, real loaders, the tabular and streamed sources), splits,
vocabularies, the data cache and batching. Never imports: models, modules or ops, training, run
directories (but their one writer, :mod:`moefast.runs.writer`), experiments, export or the
command line: data knows no model and no training.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from moefast.config import DEFAULT_PRESET
from moefast.data.batching import BatchLoader, BatchOrder
from moefast.data.dataset import Batch, MultiDomainDataset, Split
from moefast.data.synthetic import SyntheticConfig

__all__: list[str] = [
    "Batch",
    "BatchLoader",
    "BatchOrder",
    "MultiDomainDataset",
    "Split",
    "SyntheticConfig",
    "load",
    "sources",
]


def _load_synthetic(*, preset: str = DEFAULT_PRESET, cache_dir: object = None, **knobs: object) -> MultiDomainDataset:
    # Generating `paper` or `taobao` takes well under a second and `wide` a few seconds, about what reading
    # the same arrays back would cost, so synthetic data is never cached and `cache_dir` is
    # accepted only so that callers can pass the same options to every source.
    from moefast.data import synthetic

    del cache_dir
    return synthetic.generate(synthetic.preset(preset, **knobs))


def _load_table(*, path: Any, schema: Any, vocab_from: Any = None, scoring: bool = False, cache_dir: Any = None,
                use_cache: bool = True, progress: bool | None = None, stream: bool = False,
                shuffle_rows: int | None = None, read_ahead: int | None = None) -> Any:
    """The tabular source: in memory (:func:`moefast.data.table.load_table`), or with ``stream``
    read from Parquet as training goes (:func:`moefast.data.stream.load_stream`, a
    :class:`~moefast.data.stream.StreamedDataset`; no dataset cache)."""
    if not isinstance(stream, bool):  # "false" is truthy: it would stream, and streaming changes results
        raise TypeError(f"stream must be True or False, got {stream!r}")
    if not stream:
        if shuffle_rows is not None or read_ahead is not None:
            raise ValueError("shuffle_rows and read_ahead apply to a streamed table (stream=True) only")
        from moefast.data.table import load_table

        return load_table(path=path, schema=schema, vocab_from=vocab_from, scoring=scoring, cache_dir=cache_dir,
                          use_cache=use_cache, progress=progress)
    from moefast.data.stream import load_stream

    del cache_dir, use_cache  # bypassed: the first pass's file fingerprint stands in for a content hash
    return load_stream(path=path, schema=schema, vocab_from=vocab_from, shuffle_rows=shuffle_rows,
                       read_ahead=read_ahead, scoring=scoring, progress=progress)


def _registry() -> dict[str, Callable[..., Any]]:
    from moefast.data.amazon import load_amazon
    from moefast.data.movielens import load_movielens
    from moefast.data.taobao import load_taobao

    return {"synthetic": _load_synthetic, "movielens-1m": load_movielens, "taobao": load_taobao,
            "amazon-6": load_amazon, "table": _load_table}


def sources() -> list[str]:
    """The dataset names :func:`load` accepts."""
    return sorted(_registry())


def load(name: str, **options: object) -> Any:
    """Load (or generate) a multi-domain dataset by name.

    Sources and options:

    - ``"synthetic"``: ``preset="taobao"`` (the default, :data:`moefast.config.DEFAULT_PRESET`),
      ``"movielens"``, ``"paper"`` or ``"wide"``, and any :class:`SyntheticConfig` knob
      (``seed=123``, ``rows``, ``num_domains``, ``diversity``, ``imbalance``, ...). Never cached.
    - ``"movielens-1m"``: ``raw_dir``, ``domain="gender"|"age"|"occupation"``,
      ``embedding_dim=8``, ``split_seed=123``, ``cache_dir``.
    - ``"taobao"``: ``raw_dir``, ``num_themes=10``, ``embedding_dim=None`` (the pretrained
      vectors' dim, else 128), ``negative_seed=123``, ``split_seed=123``, ``cache_dir``.
    - ``"amazon-6"``: ``raw_dir``, ``categories=None`` (the six files found), ``embedding_dim=8``,
      ``negative_seed=123``, ``split_seed=123``, ``cache_dir``.
    - ``"table"``: your own click log: ``path`` (CSV / TSV, gzip, Parquet, or a folder of
      parts), ``schema`` (a TOML file, dict or :class:`moefast.data.schema.TableSchema`),
      ``vocab_from=RUN_DIR``, ``scoring``, ``cache_dir``, ``use_cache``, ``progress``
      (:func:`moefast.data.table.load_table`); ``stream=True`` (Parquet) reads it as training
      goes instead, in bounded memory, with ``shuffle_rows`` and ``read_ahead`` (bytes): a
      :class:`moefast.data.stream.StreamedDataset` (:func:`moefast.data.stream.load_stream`).

    Real sources read local raw files only (never download) and cache the processed dataset
    under ``cache_dir`` (default ``$MOEFAST_CACHE`` or ``~/.cache/moefast``).

    Raises:
        ValueError: an unknown name or option, naming it.
    """
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(registry)}")
    loader = registry[name]
    params = inspect.signature(loader).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; known: {sorted(params)}")
    return loader(**options)
