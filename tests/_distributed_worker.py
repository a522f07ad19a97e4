"""One rank of the data-parallel tests (tests/test_distributed.py), started by
``torch.multiprocessing``: joins a gloo (or NCCL) group on the loopback interface, trains the
parity setting under each embedding optimizer, runs a few synchronised steps by hand, provokes
the two failures, and saves what it saw to ``out/rank<r>.pt`` for the test to compare."""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moefast import data, models
from moefast.config import EmbeddingOptimizer, TablePrecision, TowerConfig, TrainConfig
from moefast.data.batching import BatchLoader, BatchOrder
from moefast.data.dataset import Batch, MultiDomainDataset
from moefast.train import fit
from moefast.train.loop import (
    NonFiniteError,
    l2_parameters,
    set_embedding_optimizer,
    stage_optimizer,
)
from moefast.train.parallel.data_parallel import RankFailedError, RowExchange, current
from moefast.train.stages import plan_stages, set_stage

# 2410 rows give domain 2 a train split of 257 rows: with batch 256 its expert stage ends on a
# 1-row global batch, so the second rank's slice is empty there.
DATASET: dict[str, Any] = {"preset": "paper", "rows": 2410, "num_domains": 3}
TOWER = TowerConfig(hidden_units=(16, 8), ranks=(2, 1))
# "lazy-adam-bf16": bf16 tables, stochastic rounding with hashed bits (the same on every rank;
# the row exchange still sends float32 gradients).
OPTIMIZERS = ("adam", "lazy-adam", "rowwise-adagrad", "lazy-adam-bf16")
HAND_STEPS = 12


def dataset() -> MultiDomainDataset:
    return data.load("synthetic", **DATASET)


def config(optimizer: str, device: str = "cpu") -> TrainConfig:
    """Fixed epochs, no early stopping (patience = max_epochs), dropout on (the tower's 0.5)."""
    bf16 = optimizer.endswith("-bf16")
    return TrainConfig(max_epochs=2, patience=2, batch_size=256, progress=False, device=device,
                       embedding_optimizer=EmbeddingOptimizer(optimizer.removesuffix("-bf16")),
                       table_precision=TablePrecision.BF16 if bf16 else TablePrecision.FP32)


def train_all(device: str = "cpu") -> dict[str, Any]:
    """The parity runs (one process or one rank of many): per optimizer, each stage's losses,
    the test WAUC, the final state dict (tables and fused optimizer state included) and the
    bytes per step."""
    ds = dataset()
    out: dict[str, Any] = {}
    for name in OPTIMIZERS:
        model = models.build("deepfm", ds, "moe-mlora", tower_config=TOWER)
        result = fit(model, ds, config(name, device), backend="fast")
        out[name] = {
            "losses": [s.losses for s in result.stages],
            "labels": [s.label for s in result.stages],
            "wauc": result.metrics["test"]["wauc"],
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "distributed": result.metrics.get("distributed"),
        }
    return out


def _by_hand(ds: MultiDomainDataset, optimizer_name: str, device: str) -> dict[str, Any]:
    """``HAND_STEPS`` synchronised steps of the joint base model; the replicated parameters,
    buffers and the dense Adam's state after them."""
    parallel = current(device)
    assert parallel is not None
    torch.manual_seed(7)
    model = models.build("deepfm", ds, "base", tower_config=TOWER).to(parallel.device)
    cfg = config(optimizer_name, device)
    from moefast.train.loop import _fused_embedding_optimizer, _table_ids

    set_embedding_optimizer(model, _fused_embedding_optimizer(cfg))
    model.to(parallel.device)
    (step,) = plan_stages(model)
    params = set_stage(model, step)
    fused = _table_ids(model)
    optimizer = stage_optimizer([p for p in params if id(p) not in fused], cfg, "fast")
    runner = parallel.wrap(model)
    loader = BatchLoader(ds.train, 100, BatchOrder.MIXED, generator=3)
    losses = []
    for k, batch in enumerate(loader):
        if k == HAND_STEPS:
            break
        losses.append(parallel.train_step(model, runner, batch, "hand", optimizer, cfg.l2, l2_parameters(model)))
    parallel.unwrap(model)
    return {
        "losses": losses,
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "adam": {k: {n: t.detach().cpu().clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()},
    }


def _failures(ds: MultiDomainDataset, device: str) -> dict[str, str]:
    """A bad id in the last rank's slice, then a NaN label in rank 0's: every rank must raise,
    with the failing rank's message."""
    parallel = current(device)
    assert parallel is not None
    model = models.build("deepfm", ds, "base", tower_config=TOWER).to(parallel.device)
    (step,) = plan_stages(model)
    params = set_stage(model, step)
    optimizer = stage_optimizer(params, config("adam"), "fast")
    batch = next(iter(BatchLoader(ds.train, 64, BatchOrder.MIXED, generator=1)))
    seen: dict[str, str] = {}
    item = batch.features["item"].clone()
    item[-1] = 10**9  # the last row: in the last rank's slice
    bad = Batch({**batch.features, "item": item}, batch.domain, batch.label)
    label = batch.label.clone()
    label[0] = math.nan
    nan = Batch(batch.features, batch.domain, label)
    for key, broken in (("bad_id", bad), ("nan", nan)):
        runner = parallel.wrap(model)
        try:
            parallel.train_step(model, runner, broken, key, optimizer, 0.0, [])
            seen[key] = "no error"
        except (RankFailedError, NonFiniteError) as exc:
            seen[key] = f"{type(exc).__name__}: {exc}"
        parallel.unwrap(model)
    try:  # an error computing rank 0's metrics reaches the ranks waiting for them
        parallel.once(lambda: 1 / 0)
        seen["once"] = "no error"
    except ZeroDivisionError as exc:
        seen["once"] = f"ZeroDivisionError: {exc}"
    return seen


def _exchange(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The row exchange on known inputs: rank r sends table 0 rows [r, 2, 5] with gradients
    r + 1 (dim 2), table 1 no rows on rank 0 and row 7 with gradient 10 (dim 1) elsewhere."""
    parallel = current(device)
    assert parallel is not None
    r = parallel.rank
    grads = [
        (torch.tensor([r, 2, 5]) if r != 2 else torch.tensor([2, 5]),
         torch.full((3 if r != 2 else 2, 2), float(r + 1))),
        (torch.zeros(0, dtype=torch.int64) if r == 0 else torch.tensor([7]),
         torch.zeros(0, 1) if r == 0 else torch.full((1, 1), 10.0)),
    ]
    merged, _ = RowExchange(parallel.row_group, parallel.world_size, parallel.device).exchange(grads, [2, 1])
    return merged


def run(rank: int, world_size: int, port: int, out: str, device: str) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
    })
    if device == "cpu":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", timeout=datetime.timedelta(seconds=120))
    try:
        ds = dataset()
        result: dict[str, Any] = {"fit": train_all(device)}
        result["hand"] = {name: _by_hand(ds, name, device) for name in ("adam", "lazy-adam")}
        result["failures"] = _failures(ds, device)
        result["exchange"] = _exchange(device)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
