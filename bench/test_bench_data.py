"""Batching one training epoch of the default synthetic dataset: moefast vs torch's DataLoader.

Workload: the ``paper`` preset's train split (120,000 rows; ``uid``, ``item``, ``domain``,
label), batch 1024, one shuffled epoch, on CPU. Providers:

- ``moefast-by-domain``: ``BatchLoader`` in the method's order (domain order shuffled, one
  domain's batches after another); ``moefast-mixed``: ``BatchLoader`` with mixed batches.
- ``torch-dataloader``: ``DataLoader(TensorDataset(...), batch_size=1024, shuffle=True)``, the
  usual way (per-sample indexing, then ``default_collate``).
- ``torch-batch-sampler``: ``DataLoader`` over the same ``TensorDataset`` with a
  ``BatchSampler`` as sampler and ``batch_size=None``: one tensor gather per column and batch,
  the fastest plain form.

``extra_info["rows_per_second"]`` gives the throughput. Run:
``python -m pytest bench/test_bench_data.py --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import moefast
from moefast.data import BatchLoader, BatchOrder

BATCH = 1024


@pytest.fixture(scope="module")
def split() -> moefast.data.Split:
    return moefast.data.load("synthetic", preset="paper").train


def _epoch(batches: Iterable[Any]) -> int:
    rows = 0
    for b in batches:
        rows += len(b) if not isinstance(b, list | tuple) else len(b[-1])
    return rows


def _providers(split: moefast.data.Split) -> dict[str, Callable[[], Iterable[Any]]]:
    cols = TensorDataset(split.features["uid"], split.features["item"], split.features["domain"],
                         split.domain, split.label)
    by_domain = BatchLoader(split, BATCH, BatchOrder.BY_DOMAIN, generator=0)
    mixed = BatchLoader(split, BATCH, BatchOrder.MIXED, generator=0)
    plain = DataLoader(cols, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    sampler = BatchSampler(RandomSampler(cols, generator=torch.Generator().manual_seed(0)), BATCH, False)
    batched = DataLoader(cols, sampler=sampler, batch_size=None)
    return {
        "moefast-by-domain": lambda: by_domain,
        "moefast-mixed": lambda: mixed,
        "torch-dataloader": lambda: plain,
        "torch-batch-sampler": lambda: batched,
    }


@pytest.mark.parametrize("provider", ["moefast-by-domain", "moefast-mixed", "torch-dataloader",
                                      "torch-batch-sampler"])
def test_epoch(benchmark: Any, split: moefast.data.Split, provider: str) -> None:
    make = _providers(split)[provider]
    benchmark.group = "data-epoch-paper-train"
    rows = benchmark.pedantic(lambda: _epoch(make()), rounds=3 if provider == "torch-dataloader" else 10,
                              warmup_rounds=1)
    assert rows == len(split)
    benchmark.extra_info["rows"] = rows
    benchmark.extra_info["rows_per_second"] = rows / benchmark.stats.stats.median
