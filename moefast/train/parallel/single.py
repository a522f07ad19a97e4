"""The single-process twin of :class:`moefast.train.parallel.data_parallel.DataParallel`: the same
methods, for a job of one process, so that the training loop has one code path.

Every collective is the identity here (a shard is every row, a gather returns its input, a
computation "on rank 0" runs here), this process writes the run directory, and a stop asked
by ``SIGTERM`` is agreed as soon as this process has it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moefast.config import Precision
from moefast.data.dataset import Batch
from moefast.train.step import apply_step, check_finite_loss, forward_loss

__all__ = ["SingleProcess"]


@dataclass
class SingleProcess:
    """One process training alone on ``device``."""

    device: torch.device
    preempt: Any = None  # SIGTERM's flag (moefast.runs.snapshot.preemption)
    run_dir: Path | None = None
    rank: int = 0
    world_size: int = 1
    launched: bool = False  # not part of a torch.distributed job (DataParallel: True)

    @property
    def is_writer(self) -> bool:
        return True

    @property
    def stop_agreed(self) -> bool:
        """Whether ``SIGTERM`` asked this process to stop, read when asked (one process has
        nothing to agree with)."""
        return bool(self.preempt)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a stage's steps call: the model itself."""
        return model

    def unwrap(self, model: torch.nn.Module) -> None:
        """Nothing to undo."""

    def batches(self, loader: Iterable[Batch]) -> Iterator[tuple[Batch, tuple[int, int, int] | None]]:
        """The epoch's batches, each the whole global batch (``None``: no other rows to place)."""
        for batch in loader:
            yield batch, None

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
        """One step on ``batch`` (CPU tensors, moved to the device here): the mean BCE plus the
        penalty (:func:`moefast.train.step.forward_loss`); returns the loss. The loss is read
        (one device sync per step) and checked before backward. ``rows`` is always ``None`` here
        (one process holds the whole global batch)."""
        assert rows is None, "one process holds the whole global batch"
        local = batch.to(self.device)
        loss, _, _ = forward_loss(runner, local, l2, l2_params, precision)
        value = float(loss.detach())
        check_finite_loss(label, value, len(batch))
        apply_step(model, loss, optimizer, after_backward)
        return value

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def once(self, compute: Callable[[], Any]) -> Any:
        return compute()

    def agree_to_stop(self) -> bool:
        return self.stop_agreed

    def barrier(self) -> None:
        """Nothing to wait for."""
