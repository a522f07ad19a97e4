"""Data-parallel staged training on ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

Launched by ``torchrun --nproc-per-node N -m moefast train ...`` (or ``moefast train --nproc N``,
which starts torchrun's elastic launcher); :func:`moefast.train.fit` runs data-parallel whenever a
default process group is initialised. N ranks compute the function one process computes with the
same global batch, up to float reduction order (docs/distributed.md):

- **Batches.** Every rank draws the same global batches (same seed, same order); rank ``r`` takes
  rows ``[start_r, stop_r)`` (:func:`shard_bounds`: sizes differ by at most one, and a rank may
  get none). Inside :func:`moefast.nn.adapter.global_batch_rows` each tower layer draws the
  global batch's dropout mask and keeps its own rows.
- **Loss.** Rank ``r``'s loss is ``N * (sum of BCE over its rows) / B`` plus the L2 term, so that
  DDP's average of the ranks' gradients is the gradient of the global batch's mean BCE plus L2
  (a sum over the global batch, never a mean of per-rank means). The summed BCE is all-reduced
  before backward together with one failure flag per rank: a non-finite loss, or an error on any
  rank (a bad id), stops every rank before any update, with the failing rank's message.
- **Dense parameters** train under ``DistributedDataParallel``, built anew for each stage
  (:meth:`DataParallel.wrap`): the trainable set changes between stages, and DDP must never see
  a changed ``requires_grad``. Embedding tables under dense Adam are dense parameters too.
- **Fused embedding tables** (lazy Adam, row-wise Adagrad) are kept out of DDP. Their backward
  hands out each table's unique rows and summed gradients; :class:`RowExchange` all-gathers
  them on its own process group, sums them per row in rank order, divides by N (TorchRec's
  convention: the optimizer sees the mean of the ranks' gradients, which the loss scaling above
  makes the global batch's gradient) and applies the same fused update on every rank.
- **Evaluation.** Each rank scores a contiguous shard of the rows, the logits are gathered in row
  order, rank 0 computes the exact AUC once and broadcasts the metrics, so every rank takes the
  same early-stopping decision.
- **Writing.** Rank 0 alone writes checkpoints and the run directory; the other ranks keep the
  same state in memory.
"""

from __future__ import annotations

import atexit
import datetime
import inspect
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moefast.config import Precision
from moefast.data.dataset import Batch
from moefast.nn.adapter import global_batch_rows
from moefast.nn.embedding import EmbeddingCollection
from moefast.train.step import apply_step, check_finite_loss, forward_loss

__all__ = [
    "DataParallel",
    "RankFailedError",
    "RowExchange",
    "StepTraffic",
    "begin_stage",
    "collective_timeout",
    "current",
    "end_stage",
    "init_from_env",
    "launched",
    "leave",
    "restarted",
    "shard_bounds",
    "slice_batch",
    "threads_per_rank",
]

# Seconds a collective may wait for the other ranks before it fails (a rank that hangs or died
# outside a collective). MOEFAST_COLLECTIVE_TIMEOUT overrides it.
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
# How long the ranks wait for each other when they leave the job (rank 0 may still be writing).
LEAVE_TIMEOUT = datetime.timedelta(hours=6)


_DDP_ARGS = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters


class RankFailedError(ValueError):
    """A rank failed during a step (an error, or a non-finite loss): raised on every rank with
    the failing rank's message, so that all stop together (a ``ValueError``: one line on the
    command line)."""


def collective_timeout() -> datetime.timedelta:
    """The collectives' timeout: ``MOEFAST_COLLECTIVE_TIMEOUT`` seconds, else the default."""
    raw = os.environ.get("MOEFAST_COLLECTIVE_TIMEOUT")
    if raw is None:
        return datetime.timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"MOEFAST_COLLECTIVE_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``total`` that ``rank`` takes: contiguous, in rank order, sizes
    ``total // N`` or one more (the first ``total % N`` ranks); empty where ``total < N``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``[start, stop)`` of ``batch`` (views; a row slice of a contiguous tensor stays
    contiguous, as the embedding engine requires)."""
    return Batch({k: v[start:stop] for k, v in batch.features.items()}, batch.domain[start:stop],
                 batch.label[start:stop])


@dataclass
class StepTraffic:
    """Bytes one rank contributes to collectives per training step, by kind (payload sizes, not
    the wire bytes of a particular algorithm: a ring all-reduce moves about 2 (N-1)/N times its
    payload per rank). ``dense``: DDP's gradient all-reduce; ``sparse``: the row exchange
    (lengths, padded ids and padded row gradients gathered from every rank); ``control``: the
    loss, failure and stop all-reduce."""

    steps: int = 0
    dense: int = 0
    sparse: int = 0
    control: int = 0

    def per_step(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"dense": self.dense / n, "sparse": self.sparse / n, "control": self.control / n,
                "total": (self.dense + self.sparse + self.control) / n}


def _fused_tables(model: torch.nn.Module) -> list[tuple[str, EmbeddingCollection, str, torch.nn.Parameter]]:
    """``(qualified name, collection, field, table)`` for every table a fused optimizer updates."""
    out = []
    for prefix, module in model.named_modules():
        if isinstance(module, EmbeddingCollection) and module.optimizer is not None:
            for spec in module.features:
                qual = f"{prefix}.tables.{spec.name}" if prefix else f"tables.{spec.name}"
                out.append((qual, module, spec.name, module.tables[spec.name]))
    return out


class RowExchange:
    """The fused tables' sparse exchange, on its own process group.

    :meth:`exchange` takes each trainable fused table's coalesced sparse gradient (its unique
    rows, ascending, and their summed gradients on this rank), gathers every rank's rows and
    gradients, and returns per table the union of the rows (ascending) with the gradients summed
    in rank order and divided by the world size: the same bits on every rank. Never a dense
    table gradient: the lengths are gathered first, then the ids and gradients padded to the
    longest rank's.
    """

    def __init__(self, group: Any, world_size: int, device: torch.device) -> None:
        self.group = group
        self.world_size = world_size
        self.device = device

    def _gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local, group=self.group)
        return out

    def exchange(
        self, grads: Sequence[tuple[torch.Tensor, torch.Tensor]], dims: Sequence[int]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """``grads[t] = (rows int64 [U_t], values float32 [U_t, D_t])`` on this rank ->
        per table the merged ``(rows [U'_t], mean gradients [U'_t, D_t])``, and the payload
        bytes this rank contributed. Row ids must be below 2^32 (the engine's table limit)."""
        n = self.world_size
        dev = self.device
        # Tables of one dim travel next to each other, so that each dim's tables merge in one
        # pass (one unique and one index_add_ per rank) instead of one pass per table.
        order = sorted(range(len(dims)), key=lambda t: dims[t])
        lengths = torch.tensor([int(r.numel()) for r, _ in grads], dtype=torch.int64, device=dev)
        all_lengths = torch.stack(self._gather(lengths)).cpu()  # [N, T]
        id_counts = all_lengths.sum(1)  # [N]
        val_counts = (all_lengths * torch.tensor(list(dims), dtype=torch.int64)).sum(1)  # [N]
        id_pad, val_pad = int(id_counts.max()), int(val_counts.max())
        ids = torch.zeros(id_pad, dtype=torch.int64, device=dev)
        vals = torch.zeros(val_pad, dtype=torch.float32, device=dev)
        if grads:
            mine_ids = torch.cat([grads[t][0] for t in order]).to(dev)
            mine_vals = torch.cat([grads[t][1].reshape(-1) for t in order]).to(dev)
            ids[: mine_ids.numel()] = mine_ids
            vals[: mine_vals.numel()] = mine_vals
        every_ids = [t.cpu() for t in self._gather(ids)]
        every_vals = [t.cpu() for t in self._gather(vals)]
        sent = lengths.numel() * 8 + id_pad * 8 + val_pad * 4
        merged: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, d))
                                                           for d in dims]
        id_base = [0] * n
        val_base = [0] * n
        for dim in sorted(set(dims)):
            tables = torch.tensor([t for t in order if dims[t] == dim], dtype=torch.int64)
            keys_parts, vals_parts = [], []
            for r in range(n):
                counts = all_lengths[r, tables]  # [G]
                count = int(counts.sum())
                # key = table index * 2^32 + row id: sorted keys are sorted by table, then row.
                keys_parts.append(torch.repeat_interleave(tables, counts) * 2**32
                                  + every_ids[r][id_base[r] : id_base[r] + count])
                vals_parts.append(every_vals[r][val_base[r] : val_base[r] + count * dim].view(count, dim))
                id_base[r] += count
                val_base[r] += count * dim
            keys, inverse = torch.unique(torch.cat(keys_parts), sorted=True, return_inverse=True)
            total = torch.zeros(keys.numel(), dim, dtype=torch.float32)
            start = 0
            for r in range(n):
                # Each rank's keys are unique: every index_add_ writes a row at most once, so
                # the sum runs in rank order on every rank, whatever the thread count.
                count = keys_parts[r].numel()
                total.index_add_(0, inverse[start : start + count], vals_parts[r])
                start += count
            total.div_(n)
            per_table = torch.bincount(keys // 2**32, minlength=len(dims))[tables].tolist()
            rows = keys % 2**32
            for t, rows_t, grads_t in zip(tables.tolist(), rows.split(per_table), total.split(per_table), strict=True):
                merged[t] = (rows_t, grads_t)
        return merged, sent


@dataclass
class DataParallel:
    """This process's place in a data-parallel job and the collectives ``fit`` uses.

    Build it with :func:`current` (from an initialised default process group)."""

    rank: int
    world_size: int
    device: torch.device
    row_group: Any
    traffic: StepTraffic = field(default_factory=StepTraffic)
    # SIGTERM: ``preempt`` is this rank's flag (true once the signal arrived here); the step's
    # all-reduce carries it, and ``stop_agreed`` is true on every rank after the same step once
    # any rank has it, so that all stop at one step boundary (rank 0 writes the snapshot).
    preempt: Any = None
    stop_agreed: bool = False
    run_dir: Path | None = None  # the job's run directory (rank 0 writes it), named when stopping
    _ddp: torch.nn.parallel.DistributedDataParallel | None = None
    _dense_bytes: int = 0

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes checkpoints and the run directory (rank 0 only)."""
        return self.rank == 0

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        # NCCL reduces device tensors only; gloo takes CPU ones.
        return t.to(self.device) if self.device.type == "cuda" else t

    # -- stages ---------------------------------------------------------------------------

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap ``model`` in a fresh DDP for the current stage (call after ``set_stage``); the
        fused tables and their optimizer state are left out of it. Returns what the training
        step calls: the DDP wrapper, or ``model`` itself when no dense parameter trains."""
        fused = _fused_tables(model)
        fused_ids = {id(p) for _, _, _, p in fused}
        for _, collection, _, _ in fused:
            collection.defer_update = True
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in fused_ids]
        self._dense_bytes = sum(p.numel() * p.element_size() for p in dense)
        self._ddp = None
        if not dense:
            return model
        ignore = [name for name, _, _, _ in fused]
        ignore += [name for name, _ in model.named_buffers() if ".optimizer_state." in f".{name}"]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # No buffer sync in forward: the only buffers are the fused optimizers' state, which
        # DDP ignores (torch 2.13 renamed broadcast_buffers; the GPU machines run 2.11).
        sync: dict[str, Any] = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                                else {"broadcast_buffers": False})
        self._ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=False, **sync,
        )
        return self._ddp

    def unwrap(self, model: torch.nn.Module) -> None:
        """End the stage: drop the DDP wrapper; the fused tables update in backward again."""
        self._ddp = None
        for _, collection, _, _ in _fused_tables(model):
            collection.defer_update = False

    # -- one training step ----------------------------------------------------------------

    def batches(self, loader: Iterable[Batch]) -> Iterator[tuple[Batch, tuple[int, int, int] | None]]:
        """The epoch's batches. Every rank draws the same global batches from an in-memory loader
        (``None``: :meth:`train_step` slices them). A loader whose ranks read apart (a streamed
        log, ``loader.reads_apart``) yields this rank's rows of each global batch: the ranks
        all-gather their row counts before every step, a global batch is the ranks' local batches
        in rank order (``(start, stop, total)``: where this rank's rows sit in it), and the epoch
        ends for every rank at the first step where any rank has no batch left (docs/distributed.md,
        "Streamed input")."""
        if not getattr(loader, "reads_apart", False):
            for batch in loader:
                yield batch, None
            return
        it = iter(loader)
        try:
            while True:
                item = next(it, None)
                mine = torch.tensor([0 if item is None else len(item)], dtype=torch.int64)
                sizes = [torch.empty_like(self._comm(mine)) for _ in range(self.world_size)]
                dist.all_gather(sizes, self._comm(mine))
                self.traffic.control += mine.numel() * 8
                counts = [int(n) for n in sizes]
                if min(counts) == 0 or item is None:
                    return
                start = sum(counts[:self.rank])
                yield item, (start, start + counts[self.rank], sum(counts))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def train_step(
        self,
        model: torch.nn.Module,
        runner: torch.nn.Module,
        batch: Batch,
        label: str,
        optimizer: torch.optim.Optimizer,
        l2: float,
        l2_params: list[torch.nn.Parameter],
        after_backward: Callable[[Any], None] | None = None,
        precision: Precision = Precision.FP32,
        rows: tuple[int, int, int] | None = None,
    ) -> float:
        """One synchronised step on this rank's slice of the global ``batch`` (CPU tensors);
        returns the global batch's loss (the same float on every rank).

        ``runner`` is what :meth:`wrap` returned; ``after_backward(model)`` runs between
        backward and the optimizer step (gradient masking of the expert stages). ``rows``
        ``(start, stop, total)``: ``batch`` is already this rank's rows ``[start, stop)`` of a
        global batch of ``total`` rows that the ranks read apart (:meth:`batches`)."""
        if rows is None:
            total = len(batch)
            start, stop = shard_bounds(total, self.rank, self.world_size)
            local = slice_batch(batch, start, stop).to(self.device)
        else:
            start, stop, total = rows
            local = batch.to(self.device)
        failure = ""
        bce_sum = 0.0
        penalty = 0.0
        loss: torch.Tensor | None = None
        try:
            with global_batch_rows(total, start, stop):
                loss, bce, l2_term = forward_loss(runner, local, l2, l2_params, precision,
                                                  sum_scale=self.world_size / total)
            # The penalty is the same on every rank: DDP's average keeps it once.
            penalty = 0.0 if l2_term is None else float(l2_term.detach())
            bce_sum = float(bce.detach())
        except Exception as exc:  # any error here must reach every rank, not hang them
            failure = f"{type(exc).__name__}: {exc}"
        flags = torch.zeros(self.world_size + 2, dtype=torch.float64)
        flags[0] = bce_sum
        flags[1 + self.rank] = 1.0 if failure else 0.0
        flags[-1] = 1.0 if self.preempt else 0.0
        flags = self._comm(flags)
        dist.all_reduce(flags)
        flags = flags.cpu()
        self.traffic.control += flags.numel() * 8
        self.stop_agreed = bool(flags[-1] > 0)
        failed = [r for r in range(self.world_size) if flags[1 + r] > 0]
        if failed:
            messages: list[Any] = [None] * self.world_size
            dist.all_gather_object(messages, failure)
            first = failed[0]
            raise RankFailedError(f"rank {first} of {self.world_size} failed: {messages[first]}")
        value = float(flags[0]) / total + penalty
        check_finite_loss(label, value, total, ranks=self.world_size)
        assert loss is not None
        apply_step(model, loss, optimizer, after_backward)
        self.traffic.dense += self._dense_bytes if self._ddp is not None else 0
        self._update_fused_tables(model)
        self.traffic.steps += 1
        return value

    def _update_fused_tables(self, model: torch.nn.Module) -> None:
        tables = [t for t in _fused_tables(model) if t[3].requires_grad]
        if not tables:
            return
        local: list[tuple[torch.Tensor, torch.Tensor]] = []
        dims: list[int] = []
        for qual, _, _, weight in tables:
            if weight.shape[0] >= 2**32:
                raise ValueError(f"{qual}: the row exchange takes tables of fewer than 2^32 rows, got {weight.shape[0]}")
            grad = weight.grad
            dims.append(weight.shape[1])
            if grad is None:
                local.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, weight.shape[1])))
                continue
            grad = grad.coalesce()
            local.append((grad.indices()[0].cpu(), grad.values().float().cpu()))
            weight.grad = None
        merged, sent = RowExchange(self.row_group, self.world_size, self.device).exchange(local, dims)
        self.traffic.sparse += sent
        updates: dict[int, tuple[EmbeddingCollection, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
        for (_, collection, name, weight), (rows, grads) in zip(tables, merged, strict=True):
            entry = updates.setdefault(id(collection), (collection, {}))
            entry[1][name] = (rows.to(weight.device), grads.to(weight.device))
        for collection, per_table in updates.values():  # one engine call per collection
            collection.apply_row_updates(per_table)

    # -- evaluation -----------------------------------------------------------------------

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of ``rows`` (int64 ``[n]``)."""
        start, stop = shard_bounds(int(rows.numel()), self.rank, self.world_size)
        return rows[start:stop]

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's float32 ``[n_r]`` in rank order (lengths first, then padded
        tensors: ``all_gather`` needs equal sizes)."""
        n = torch.tensor([local.numel()], dtype=torch.int64)
        sizes = [torch.empty_like(self._comm(n)) for _ in range(self.world_size)]
        dist.all_gather(sizes, self._comm(n))
        counts = [int(s) for s in sizes]
        pad = torch.zeros(max(counts), dtype=local.dtype)
        pad[: local.numel()] = local
        parts = [torch.empty_like(self._comm(pad)) for _ in range(self.world_size)]
        dist.all_gather(parts, self._comm(pad))
        return torch.cat([p.cpu()[:c] for p, c in zip(parts, counts, strict=True)])

    def once(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0, its result broadcast to every rank (the exact AUC is
        computed once, and every rank acts on the same number)."""
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box = [(True, compute())]
            except Exception as exc:  # the other ranks wait in the broadcast: they raise it too
                box = [(False, exc)]
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def agree_to_stop(self) -> bool:
        """Whether any rank has been asked to stop (``SIGTERM``), the same answer on every rank:
        the check at a boundary outside a step (an epoch's or a stage's end)."""
        flag = self._comm(torch.tensor([1.0 if self.preempt else 0.0], dtype=torch.float64))
        dist.all_reduce(flag)
        self.stop_agreed = self.stop_agreed or bool(flag.item() > 0)
        return self.stop_agreed

    def barrier(self) -> None:
        dist.barrier()


def leave(finished: bool) -> None:
    """Leave the job this process joined (:func:`init_from_env`): after a finished or
    preempted run (every rank stops at the same boundary), wait for every rank (rank 0 writes the
    run's outputs or its snapshot last), then destroy the process group. A
    gloo group left to the interpreter's exit can abort the process ("terminate called without
    an active exception") while its threads are torn down."""
    if not dist.is_available() or not dist.is_initialized():
        return
    try:
        if finished:
            if dist.get_backend() == "gloo":
                # Not the collective timeout: the other ranks wait here while rank 0 writes the
                # run's outputs, which may take longer (a large snapshot or checkpoint).
                dist.monitored_barrier(timeout=LEAVE_TIMEOUT)
            else:
                dist.barrier()
    finally:
        dist.destroy_process_group()


def threads_per_rank(local_world_size: int) -> int:
    """Torch threads (and so the embedding engine's pool) of each of ``local_world_size`` ranks
    on this machine: ``MOEFAST_THREADS_PER_RANK``, else the cores divided by the ranks. torchrun's
    ``OMP_NUM_THREADS=1`` default is not followed (it leaves cores idle when there are fewer ranks
    than cores)."""
    raw = os.environ.get("MOEFAST_THREADS_PER_RANK")
    if raw is None:
        return max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"MOEFAST_THREADS_PER_RANK must be a positive whole number, got {raw!r}")
    return int(raw)


def init_from_env(device: str = "cpu") -> DataParallel | None:
    """Join the job ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``...) unless a default group exists already; ``None`` outside
    torchrun. gloo on CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``); collectives time out
    after :func:`collective_timeout`. Each rank's torch threads (and so the engine's pool):
    :func:`threads_per_rank`."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not launched():
            return None
        kind = torch.device(device).type
        if kind == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if kind == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart not in ("", "0") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store across restarts: without a fresh prefix, a
            # restarted rank reads the previous attempt's gloo addresses and waits on dead ports.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  int(os.environ["WORLD_SIZE"]), is_master=False, timeout=collective_timeout())
            dist.init_process_group(
                backend, store=dist.PrefixStore(f"moefast/attempt-{restart}", store),
                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=collective_timeout(),
            )
        else:
            dist.init_process_group(backend, timeout=collective_timeout())
        # A script that trains through the Python API and simply returns would leave the group
        # to the interpreter's teardown, which can abort the process (see leave()).
        atexit.register(_leave_at_exit)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(threads_per_rank(local_world))
    return current(device)


def _leave_at_exit() -> None:
    """The exit-time fallback of :func:`leave`: destroy the group this process joined, if it
    still exists, before the interpreter tears down the threads behind it. No barrier: every
    rank may be exiting for its own reason (an error on one rank, say), and a barrier would then
    wait out the collective timeout."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched() -> bool:
    """Whether this process is a rank of a job torchrun (or another launcher) described in the
    environment (``WORLD_SIZE`` set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def restarted() -> bool:
    """Whether torchrun restarted this job after a failure (``TORCHELASTIC_RESTART_COUNT > 0``):
    ``moefast train`` then resumes the run from its last snapshot."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0") > 0


_CONTEXT: dict[tuple[int, str], DataParallel] = {}


def current(device: str | torch.device = "cpu") -> DataParallel | None:
    """The :class:`DataParallel` of the initialised default process group (``None`` without one).
    The row exchange gets its own group, created once (a collective: every rank calls this)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    key = (id(dist.group.WORLD), str(dev))
    if key not in _CONTEXT:
        _CONTEXT[key] = DataParallel(dist.get_rank(), dist.get_world_size(), dev, dist.new_group())
    ctx = _CONTEXT[key]
    ctx.traffic = StepTraffic()
    return ctx


def begin_stage(parallel: DataParallel | None, model: torch.nn.Module) -> torch.nn.Module:
    """The module a stage's training steps call (after ``set_stage``): ``model`` itself, or a
    fresh DDP wrapper under data parallelism. End the stage with :func:`end_stage`."""
    return model if parallel is None else parallel.wrap(model)


def end_stage(parallel: DataParallel | None, model: torch.nn.Module) -> None:
    """Drop the stage's DDP wrapper; the fused tables update inside backward again."""
    if parallel is not None:
        parallel.unwrap(model)
