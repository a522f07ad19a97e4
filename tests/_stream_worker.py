"""One rank of the streamed data-parallel test (tests/test_stream_distributed.py), started by
``torch.multiprocessing``: joins a gloo group on the loopback interface, trains a MoE-MLoRA run
on a streamed log (each rank reading its own shard of the row groups) and saves its per-step
losses, test WAUC and the row groups it read to ``out/rank<r>.pt``."""

from __future__ import annotations

import datetime
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moefast import models
from moefast.config import EmbeddingOptimizer, TowerConfig, TrainConfig
from moefast.data import stream
from moefast.train import fit
from moefast.train.errors import CapWarning

TOWER = TowerConfig(hidden_units=(16, 8), ranks=(2, 1))


def config() -> TrainConfig:
    return TrainConfig(max_epochs=1, patience=1, batch_size=64, eval_every=None, progress=False,
                       embedding_optimizer=EmbeddingOptimizer.LAZY_ADAM)


def train(log: Path, schema: dict[str, Any], vocab: Path, shards: int | None) -> dict[str, Any]:
    """The run (one process reading ``shards`` shards, or one rank reading its own): each
    stage's losses, the test WAUC, and the training row groups of each shard's epoch, in the
    order read."""
    ds = stream.open_stream(log, schema, vocab, shuffle_rows=120, read_ahead=1 << 16, shards=shards)
    read: list[list[str]] = []
    real = stream.StreamedSplit.chunks

    def spy(self: stream.StreamedSplit, units: Any, *args: Any, **kw: Any) -> Any:
        if self.index == 0:
            read.append([f"{u.path}:{u.group}" for u in units])
        return real(self, units, *args, **kw)

    stream.StreamedSplit.chunks = spy  # type: ignore[method-assign]
    try:
        model = models.build("deepfm", ds, "moe-mlora", tower_config=TOWER, seed=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CapWarning)
            result = fit(model, ds, config(), backend="fast")
    finally:
        stream.StreamedSplit.chunks = real  # type: ignore[method-assign]
    return {"losses": {r.label: r.losses for r in result.stages}, "wauc": result.metrics["test"]["wauc"],
            "samples": [r.train_samples for r in result.stages], "read": read}


def run(rank: int, world_size: int, port: int, out: str, log: str, schema: str, vocab: str) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
        "GLOO_SOCKET_IFNAME": "lo",
    })
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        result = train(Path(log), json.loads(schema), Path(vocab), None)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The rank's results are on disk: skip the interpreter's teardown of torch and its threads,
    # about a second per process (2.6 s of the test's wall time with two ranks on two cores).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
