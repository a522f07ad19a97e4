"""Data-parallel training throughput and traffic (issue 19; docs/distributed.md).

Workload: DeepFM with a MoE-MLoRA tower (256, 128, 64), fast backend, the backbone stage (every
dense parameter and every embedding table trains), mixed batches of 1024 rows (the global
batch), ``WARMUP`` steps then ``STEPS`` timed steps, data prepared before the clock starts.

- ``samples-<preset>``: samples/s on this machine with 1 process at 1 thread, 2 processes at 1
  thread each (gloo, loopback; each rank trains its half of every global batch) and 1 process
  at 2 threads (torchrun would set ``OMP_NUM_THREADS=1``; the threads are set explicitly here).
  ``1proc-1thread-ddp`` is the data-parallel code at world size 1 (its overhead alone).
  ``paper`` runs the method's dense Adam; ``wide`` (26 fields, tables up to 2e6 rows) runs the
  fused lazy Adam (dense Adam on its tables measures a 400 MB all-reduce, see below).
- ``bytes-wide``: bytes each rank contributes to collectives per step on ``wide`` with 2 ranks,
  under dense Adam (every table all-reduced like a dense parameter) and under lazy Adam (the
  batch's unique rows and their gradients all-gathered), from ``DataParallel.traffic``.

Every scenario runs in fresh processes (``torch.multiprocessing``, spawn), which report
samples/s and bytes per step in ``extra_info``; the timed figure of pytest-benchmark is the whole
scenario, processes included, and is not the throughput. Results:
``make bench BENCH_PATH=bench/test_bench_distributed.py BENCH_NAME=cpu-x86_64-distributed``.
GPU (NCCL) figures are not measured here (no GPU lent); the same scenarios run with
``device="cuda"`` unchanged.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BATCH = 1024
WARMUP = 3
STEPS = {"paper": 400, "wide": 60}
BYTES_STEPS = 3
ROWS = {"paper": 200_000, "wide": 100_000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, spec: dict[str, Any], out: str) -> None:
    torch.set_num_threads(spec["threads"])
    use_dist = spec["dist"]
    if use_dist:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                           "WORLD_SIZE": str(world), "GLOO_SOCKET_IFNAME": "lo"})
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    from moefast import data, models
    from moefast.config import EmbeddingOptimizer, TrainConfig
    from moefast.data.batching import BatchLoader, BatchOrder
    from moefast.train.loop import (
        _fused_embedding_optimizer,
        _set_backend,
        _table_ids,
        l2_parameters,
        set_embedding_optimizer,
        stage_optimizer,
        train_step,
    )
    from moefast.train.parallel.data_parallel import current
    from moefast.train.stages import plan_stages, set_stage

    ds = data.load("synthetic", preset=spec["preset"], rows=ROWS[spec["preset"]])
    torch.manual_seed(0)
    model = models.build("deepfm", ds, "moe-mlora")
    config = TrainConfig(batch_size=BATCH, progress=False, embedding_optimizer=EmbeddingOptimizer(spec["optimizer"]))
    backend = _set_backend(model, "fast")
    set_embedding_optimizer(model, _fused_embedding_optimizer(config))
    step = plan_stages(model)[0]
    params = set_stage(model, step)
    fused = _table_ids(model)
    optimizer = stage_optimizer([p for p in params if id(p) not in fused], config, backend)
    l2 = l2_parameters(model)
    batches = list(BatchLoader(ds.train, BATCH, BatchOrder.MIXED, generator=1, drop_last=True))
    steps = spec["steps"]
    parallel = current() if use_dist else None
    runner = parallel.wrap(model) if parallel is not None else model
    seconds = 0.0
    for k in range(WARMUP + steps):
        batch = batches[k % len(batches)]
        if k == WARMUP:
            if parallel is not None:
                parallel.barrier()
                parallel.traffic.__init__()  # count the timed steps only
            start = time.perf_counter()
        if parallel is not None:
            parallel.train_step(model, runner, batch, "bench", optimizer, config.l2, l2)
        else:
            train_step(model, batch, step, optimizer, config.l2, l2)
    if parallel is not None:
        parallel.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        result = {"samples_per_second": steps * BATCH / seconds, "seconds": seconds, "steps": steps,
                  "threads_per_process": spec["threads"], "processes": world,
                  "bytes_per_step": parallel.traffic.per_step() if parallel is not None else None}
        torch.save(result, Path(out) / "result.pt")
    if use_dist:
        dist.destroy_process_group()


def _scenario(spec: dict[str, Any], processes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(processes, _free_port(), spec, tmp), nprocs=processes,
                           join=True, start_method="spawn")
        result: dict[str, Any] = torch.load(Path(tmp) / "result.pt", weights_only=False)
    return result


THROUGHPUT = {
    "1proc-1thread": (1, 1, False),
    "1proc-1thread-ddp": (1, 1, True),
    "2proc-1thread": (2, 1, True),
    "1proc-2threads": (1, 2, False),
}


def _record(benchmark: Any, spec: dict[str, Any], processes: int) -> dict[str, Any]:
    holder: dict[str, Any] = {}
    benchmark.pedantic(lambda: holder.update(_scenario(spec, processes)), rounds=1, iterations=1)
    benchmark.extra_info.update(spec)
    benchmark.extra_info.update(holder)
    benchmark.extra_info["global_batch"] = BATCH
    # The machine is shared: the load average says how busy it was around the measurement.
    benchmark.extra_info["load_average_1min"] = os.getloadavg()[0]
    return holder


@pytest.mark.parametrize("preset,optimizer", [("paper", "adam"), ("wide", "lazy-adam")])
@pytest.mark.parametrize("setup", list(THROUGHPUT))
def test_samples_per_second(benchmark: Any, preset: str, optimizer: str, setup: str) -> None:
    processes, threads, use_dist = THROUGHPUT[setup]
    benchmark.group = f"distributed-samples-{preset}"
    spec = {"preset": preset, "optimizer": optimizer, "threads": threads, "dist": use_dist,
            "steps": STEPS[preset], "setup": setup}
    result = _record(benchmark, spec, processes)
    assert result["samples_per_second"] > 0


@pytest.mark.parametrize("optimizer", ["adam", "lazy-adam"])
def test_bytes_per_step_wide(benchmark: Any, optimizer: str) -> None:
    benchmark.group = "distributed-bytes-wide"
    spec = {"preset": "wide", "optimizer": optimizer, "threads": 1, "dist": True, "steps": BYTES_STEPS,
            "setup": f"2proc-{optimizer}"}
    result = _record(benchmark, spec, 2)
    sent = result["bytes_per_step"]
    assert (sent["sparse"] > 0) == (optimizer != "adam")
