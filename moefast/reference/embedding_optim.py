"""Sparse embedding optimizers: configs and the plain-PyTorch specification of each update.

Both optimizers touch only the rows of a batch. They are not the same algorithms as dense
``torch.optim.Adagrad`` / ``torch.optim.Adam`` (which update every row each step), so parity
tests compare the fused C++ updates with the functions here, like with like.

The inputs of an update are the **unique rows** of one table seen in a batch (``int64 [U]``,
sorted ascending, no repeats) and their **summed gradients** (``float32 [U, D]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FusedOptimizer",
    "LazyAdam",
    "RowwiseAdagrad",
    "lazy_adam_update_",
    "rowwise_adagrad_update_",
    "sparse_update_",
]


@dataclass(frozen=True)
class RowwiseAdagrad:
    """Row-wise Adagrad, as FBGEMM's ``EXACT_ROWWISE_ADAGRAD``: one accumulator per row.

    For a row with summed gradient ``g [D]``: ``s += mean(g * g)``;
    ``w -= lr * g / (sqrt(s) + eps)``. State: ``sum`` float32 ``[V]``.
    """

    lr: float = 0.01
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"RowwiseAdagrad: lr must be a positive finite float, got {self.lr}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"RowwiseAdagrad: eps must be a positive finite float, got {self.eps}")

    def init_state(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero state for a ``[V, D]`` table."""
        return {"sum": torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)}


@dataclass(frozen=True)
class LazyAdam:
    """Lazy Adam: Adam's update applied only to the rows seen, each with its own step count.

    A row's bias correction uses the number of batches that row has appeared in (``step [V]``),
    so a rarely seen row is not under-corrected as it would be with a global step (this is
    where it differs from ``torch.optim.SparseAdam``). For a row at its step ``t``:
    ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g * g``;
    ``w -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
    State: ``exp_avg`` and ``exp_avg_sq`` float32 ``[V, D]``, ``step`` int64 ``[V]``.
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"LazyAdam: lr must be a positive finite float, got {self.lr}")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"LazyAdam: {name} must be in [0, 1), got {beta}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"LazyAdam: eps must be a positive finite float, got {self.eps}")

    def init_state(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero state for a ``[V, D]`` table."""
        return {
            "exp_avg": torch.zeros_like(weight, dtype=torch.float32),
            "exp_avg_sq": torch.zeros_like(weight, dtype=torch.float32),
            "step": torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device),
        }


FusedOptimizer = RowwiseAdagrad | LazyAdam


@torch.no_grad()
def rowwise_adagrad_update_(
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    grads: torch.Tensor,
    config: RowwiseAdagrad,
) -> None:
    """Apply row-wise Adagrad in place to ``weight [V, D]`` for ``rows [U]`` / ``grads [U, D]``."""
    acc = state["sum"]
    acc[rows] += grads.pow(2).mean(dim=1)
    scale = config.lr / (acc[rows].sqrt() + config.eps)  # [U]
    weight[rows] -= scale[:, None] * grads


@torch.no_grad()
def lazy_adam_update_(
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    grads: torch.Tensor,
    config: LazyAdam,
) -> None:
    """Apply lazy Adam in place to ``weight [V, D]`` for ``rows [U]`` / ``grads [U, D]``."""
    step = state["step"][rows] + 1  # int64 [U]
    state["step"][rows] = step
    m = state["exp_avg"][rows] * config.beta1 + (1 - config.beta1) * grads
    v = state["exp_avg_sq"][rows] * config.beta2 + (1 - config.beta2) * grads * grads
    state["exp_avg"][rows] = m
    state["exp_avg_sq"][rows] = v
    # Bias corrections in float64, then one rounding to float32 (the C++ update does the same).
    t = step.double()
    step_size = (config.lr / (1 - torch.pow(config.beta1, t))).float()  # [U]
    bc2_sqrt = torch.sqrt(1 - torch.pow(config.beta2, t)).float()  # [U]
    denom = v.sqrt() / bc2_sqrt[:, None] + config.eps
    weight[rows] -= step_size[:, None] * m / denom


def sparse_update_(
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    grads: torch.Tensor,
    config: FusedOptimizer,
) -> None:
    """Dispatch to the update of ``config``'s algorithm."""
    if isinstance(config, RowwiseAdagrad):
        rowwise_adagrad_update_(weight, state, rows, grads, config)
    elif isinstance(config, LazyAdam):
        lazy_adam_update_(weight, state, rows, grads, config)
    else:
        raise TypeError(f"unknown fused optimizer {config!r}; use RowwiseAdagrad or LazyAdam")
