"""One training step's arithmetic, shared by the single-process step and the data-parallel one
(:class:`moefast.train.parallel.SingleProcess`, :class:`moefast.train.parallel.DataParallel`).

The loss is BCE plus ``l2`` times the squared norm of the stage's regularised tensors; the
forward runs under :func:`moefast.train.precision.step_precision` (the one place the precision
option applies); a loss that is not finite stops the stage before backward (a fused embedding
optimizer updates its tables inside backward, so a NaN must not get that far); then backward,
the stage's gradient masking and the optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from moefast.config import Precision
from moefast.data.dataset import Batch
from moefast.train.errors import NonFiniteError
from moefast.train.precision import step_precision

__all__ = ["apply_step", "check_finite_loss", "forward_loss"]


def forward_loss(
    runner: torch.nn.Module,
    batch: Batch,
    l2: float,
    l2_params: list[torch.nn.Parameter],
    precision: Precision,
    *,
    sum_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, bce, l2_term)`` of ``batch`` through ``runner``.

    ``sum_scale``: ``None`` takes the BCE's mean over the batch (one process); a number takes
    its sum times that number (a data-parallel rank's slice: ``world_size / global rows``, so
    DDP's average of the ranks' gradients is the global batch's mean). ``bce`` is the BCE as
    reduced (mean or sum), ``l2_term`` the penalty (``None`` without one)."""
    with step_precision(precision):
        logits = runner(batch.features, batch.domain)
    if sum_scale is None:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label)
        loss = bce
    else:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label, reduction="sum")
        loss = bce * sum_scale
    l2_term = None
    if l2 > 0 and l2_params:
        l2_term = l2 * torch.stack([p.pow(2).sum() for p in l2_params]).sum()
        loss = loss + l2_term
    return loss, bce, l2_term


def check_finite_loss(label: str, value: float, rows: int, *, ranks: int = 1) -> None:
    """:class:`NonFiniteError` for a training loss that is NaN or infinite, naming the stage."""
    if math.isfinite(value):
        return
    where = f"a batch of {rows} rows" if ranks == 1 else f"a global batch of {rows} rows"
    every = "" if ranks == 1 else " on every rank"
    raise NonFiniteError(
        f"{label}: the training loss is {value} on {where}; training diverged and stops here{every}, before "
        "the optimizer step. Try a smaller lr (or embedding_lr), or a smaller l2."
    )


def apply_step(
    model: torch.nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    after_backward: Callable[[Any], None] | None,
) -> None:
    """Backward, ``after_backward(model)`` (the expert stages' gradient masking), the step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward(model)
    optimizer.step()
