"""Inference cost of the serving forms (issue 18): throughput and latency at batch 1, 64, 4096.

Workload: DeepFM with a MoE-MLoRA tower (256, 128, 64), one expert per domain (E = 20, ranks
from the alpha table), on the synthetic ``taobao`` preset (uid, item and domain fields of dim 8,
20 domains, the claims' core setting), B, c and the gate randomised (trained values; fresh
adapters are zero). Every benchmark is one eval forward of ``batch`` rows drawn from the test
split (all domains mixed), under ``torch.no_grad``.

Providers (all in the same process, so ratios compare like with like):

- ``base``: the same backbone with the base tower (no adapters): the yardstick. moefast's
  fast path (C++ embedding engine, fused C++ tower node).
- ``base-torch``: the base model with torch's own lookups (the reference backend).
- ``reference``: the trained MoE-MLoRA model, reference backend (the seeds' per-expert loop).
- ``fast``: the trained MoE-MLoRA model, fast backend (C++ engine, fused tower node).
- ``merged``: :func:`moefast.export.merge` of it, C++ embedding engine, per-domain tower (the C++
  op ``torch.ops.moefast.merged_tower``).
- ``merged-torch``: the merged model's :class:`~moefast.export.ServingModule` (torch's own
  lookups) run eagerly, its tower still the C++ op.
- ``exported``: the ``torch.export`` program (``.pt2``) loaded with ``torch.export.load``: torch
  lookups and the tower as the traced torch loop (``MergedTower.grouped_forward``).

``test_ratio_to_base`` times ``base``, ``merged``, ``merged-torch``, ``exported`` and ``fast``
interleaved, call after call in each round, so that a shared machine's load falls on all of them
alike; it records the ratios of the medians over the rounds and of the fastest rounds (the cost
without the waits a loaded machine adds; on a quiet machine the two agree).

Threads: 1 and 2 (``torch.set_num_threads``; the C++ engine's pool follows it). Warm-up: 3
rounds before timing (pytest-benchmark's ``warmup_rounds``). Targets: ``merged`` at most 1.2x
``base`` at batch 4096, at 1 and at 2 threads. Results:
``make bench BENCH_PATH=bench/test_bench_serving.py BENCH_NAME=cpu-x86_64-serving``; the table
in docs/serving.md comes from ``bench/report_serving.py``.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moefast import data, models
from moefast.data.dataset import MultiDomainDataset
from moefast.export import export_program, merge, serving_module
from moefast.models.base import CTRModel
from moefast.train.loop import _set_backend

BATCHES = (1, 64, 4096)
THREADS = (1, 2)
PROVIDERS = ("base", "base-torch", "reference", "fast", "merged", "merged-torch", "exported")
LOOKUP = {"base": "moefast C++ engine", "base-torch": "torch", "reference": "torch (moefast reference op)",
          "fast": "moefast C++ engine", "merged": "moefast C++ engine", "merged-torch": "torch",
          "exported": "torch (in the program)"}
WARMUP = 3


@functools.cache
def _dataset() -> MultiDomainDataset:
    return data.load("synthetic", preset="taobao", rows=60_000)


def _randomise(model: CTRModel) -> CTRModel:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.tower.hidden_layers():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.lora_c.copy_(torch.randn(layer.lora_c.shape, generator=g) * 0.1)
        for p in model.tower.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


@functools.cache
def _forms() -> dict[str, Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]]:
    ds = _dataset()
    base = models.build("deepfm", ds, "base", seed=1).eval()
    base_torch = models.build("deepfm", ds, "base", seed=1).eval()
    _set_backend(base, "fast")
    _set_backend(base_torch, "reference")
    trained = _randomise(models.build("deepfm", ds, "moe-mlora", seed=1))
    reference = _randomise(models.build("deepfm", ds, "moe-mlora", seed=1))
    _set_backend(trained, "fast")
    _set_backend(reference, "reference")
    merged = merge(trained, backend="fast")
    serving = serving_module(merge(trained, backend="reference"))
    folder = Path(tempfile.mkdtemp(prefix="moefast-bench-serving-"))
    export_program(merge(trained, backend="reference"), folder / "model.pt2")
    program = torch.export.load(str(folder / "model.pt2")).module()
    return {"base": base, "base-torch": base_torch, "reference": reference, "fast": trained,
            "merged": merged, "merged-torch": serving, "exported": program}


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_serving(benchmark: Any, provider: str, batch: int, threads: int) -> None:
    ds = _dataset()
    forward = _forms()[provider]
    rows = ds.test.rows(torch.arange(batch) % len(ds.test))
    features, domain = dict(rows.features), rows.domain

    def run() -> torch.Tensor:
        with torch.no_grad():
            return forward(features, domain)

    benchmark.group = f"serving-batch{batch}-threads{threads}"
    # Small batches are timed over more calls: a call is tens of microseconds.
    rounds, iterations = {1: (200, 5), 64: (100, 3), 4096: (30, 1)}[batch]
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=WARMUP)
    benchmark.extra_info.update(provider=provider, batch=batch, threads=threads, lookup=LOOKUP[provider],
                                workload="deepfm moe-mlora, synthetic taobao (20 domains, E=20)",
                                warmup_rounds=WARMUP)
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(rows_per_second=batch / median, latency_ms=median * 1e3)


INTERLEAVED = ("base", "merged", "merged-torch", "exported", "fast")


@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("batch", BATCHES)
def test_ratio_to_base(benchmark: Any, batch: int, threads: int) -> None:
    ds = _dataset()
    forms = _forms()
    rows = ds.test.rows(torch.arange(batch) % len(ds.test))
    features, domain = dict(rows.features), rows.domain
    times: dict[str, list[float]] = {name: [] for name in INTERLEAVED}

    def run() -> None:
        with torch.no_grad():
            for name in INTERLEAVED:
                start = time.perf_counter()
                forms[name](features, domain)
                times[name].append(time.perf_counter() - start)

    benchmark.group = f"interleaved-batch{batch}-threads{threads}"
    rounds = {1: 400, 64: 200, 4096: 200}[batch]
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=WARMUP)
    medians = {name: statistics.median(t[WARMUP:]) for name, t in times.items()}
    # The fastest round: the cost without the waits a shared machine adds (timeit's rule).
    fastest = {name: min(t[WARMUP:]) for name, t in times.items()}
    benchmark.extra_info.update(
        provider="interleaved", batch=batch, threads=threads, warmup_rounds=WARMUP,
        median_ms={name: m * 1e3 for name, m in medians.items()},
        ratio_to_base={name: m / medians["base"] for name, m in medians.items()},
        min_ms={name: m * 1e3 for name, m in fastest.items()},
        min_ratio_to_base={name: m / fastest["base"] for name, m in fastest.items()},
    )
