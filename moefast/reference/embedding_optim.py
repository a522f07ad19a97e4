"""Sparse embedding optimizers: configs and the plain-PyTorch specification of each update.

Both optimizers touch only the rows of a batch. They are not the same algorithms as dense
``torch.optim.Adagrad`` / ``torch.optim.Adam`` (which update every row each step), so parity
tests compare the fused C++ updates with the functions here, like with like.

The inputs of an update are the **unique rows** of one table seen in a batch (``int64 [U]``,
sorted ascending, no repeats) and their **summed gradients** (``float32 [U, D]``).

**Half tables** (float16 or bfloat16 weights): the state stays float32; each updated element is
computed in float32 from the stored value (converted exactly) and written back with **stochastic
rounding** (:func:`stochastic_round`): up or down to a neighbouring half value with probabilities
that make the expected result the float32 value. Its random bits (:func:`rounding_bits`) are a
counter-based hash of (the optimizer's ``seed``, the table's key, the row, the row's step, the
column), never a generator's position, so an update rounds the same at any thread count, on
every data-parallel rank and after a resume, and nothing enters the state. The row's "step" is
its new step count under lazy Adam; row-wise Adagrad has none, so there it is the new
accumulator's bits and a fold of the row's gradient (:func:`_adagrad_step`). The C++ engine
(``csrc/half.h``) computes the same bits and the same float32 values: fast and reference are
bitwise equal on the update.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

__all__ = [
    "HALF_TABLE_DTYPES",
    "TABLE_DTYPES",
    "FusedOptimizer",
    "LazyAdam",
    "RowwiseAdagrad",
    "lazy_adam_update_",
    "rounding_bits",
    "rowwise_adagrad_update_",
    "sparse_update_",
    "stochastic_round",
    "table_key",
]

TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_TABLE_DTYPES = (torch.float16, torch.bfloat16)


def state_slots(optimizer: FusedOptimizer) -> tuple[tuple[str, torch.dtype, bool], ...]:
    """``optimizer``'s state tensors per table: (slot, dtype, per element of the table rather
    than per row), as ``init_state`` makes them."""
    if isinstance(optimizer, RowwiseAdagrad):
        return (("sum", torch.float32, False),)
    return (("exp_avg", torch.float32, True), ("exp_avg_sq", torch.float32, True), ("step", torch.int64, False))


def check_state(optimizer: FusedOptimizer, state: object, name: str, weight: torch.Tensor) -> None:
    """``TypeError`` naming the field and slot unless ``state`` holds every slot of
    :func:`state_slots` with its dtype, on ``weight``'s device, shaped ``[V, D]`` or ``[V]``."""
    for slot, dtype, per_element in state_slots(optimizer):
        value = state.get(slot) if isinstance(state, dict) else None
        shape = tuple(weight.shape) if per_element else (weight.shape[0],)
        if (not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != shape
                or value.device != weight.device):
            raise TypeError(f"field {name!r}: optimizer state {slot!r} must be a {dtype} tensor of shape {shape} "
                            f"on {weight.device} (use optimizer.init_state(weight))")


def _check_numbers(owner: str, **values: object) -> None:
    """``TypeError`` naming the first hyperparameter that is not a real number (a bool, a string,
    None, a complex number), before the range checks compare it."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{owner}: {name} must be a number, got {value!r}")


def _check_seed(owner: str, seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"{owner}: seed must be a whole number in [0, 2^64), got {seed!r}")


@dataclass(frozen=True)
class RowwiseAdagrad:
    """Row-wise Adagrad, as FBGEMM's ``EXACT_ROWWISE_ADAGRAD``: one accumulator per row.

    For a row with summed gradient ``g [D]``: ``s += mean(g * g)``;
    ``w -= lr * g / (sqrt(s) + eps)``. State: ``sum`` float32 ``[V]``. ``seed`` draws the
    stochastic rounding of half tables (see the module docstring).
    """

    lr: float = 0.01
    eps: float = 1e-8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_seed("RowwiseAdagrad", self.seed)
        _check_numbers("RowwiseAdagrad", lr=self.lr, eps=self.eps)
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
    State: ``exp_avg`` and ``exp_avg_sq`` float32 ``[V, D]``, ``step`` int64 ``[V]``. ``seed``
    draws the stochastic rounding of half tables (see the module docstring).
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_seed("LazyAdam", self.seed)
        _check_numbers("LazyAdam", lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps)
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


# ---------------------------------------------------------------------------------------------
# Stochastic rounding (csrc/half.h). uint64 arithmetic in int64 tensors: torch's int64 products
# and sums wrap modulo 2^64, and a logical right shift is an arithmetic one, masked.

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    """The int64 with the bits of the uint64 ``x``."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(z: torch.Tensor, shift: int) -> torch.Tensor:
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, elementwise on int64 tensors holding uint64 bits."""
    z = (z ^ _srl(z, 30)) * _signed(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX2)
    return z ^ _srl(z, 31)


def _mix64_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def table_key(name: str) -> int:
    """The key that identifies a table in the rounding bits: CRC-32 of its field name (the same
    on every rank and in every process)."""
    return zlib.crc32(name.encode())


def rounding_bits(seed: int, key: int, rows: torch.Tensor, step: torch.Tensor, dim: int) -> torch.Tensor:
    """int64 ``[U, dim]``: 64 random bits for each element of ``rows [U]`` of the table ``key``,
    at the rows' ``step [U]`` (int64 holding uint64 bits)."""
    table = _mix64_int(_mix64_int(seed ^ _GOLDEN) ^ key)  # once per table and call
    row_key = _mix64(_mix64(rows.long() ^ _signed(table)) + step)  # [U]
    columns = (torch.arange(1, dim + 1, dtype=torch.int64, device=rows.device) * _signed(_GOLDEN))  # [D]
    return _mix64(row_key[:, None] + columns[None, :])


def _as_int16(bits: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^16) -> int16 with the same 16 bits."""
    return torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` (float16 or bfloat16) stochastically with ``bits`` (int64,
    ``x``'s shape, uniform random): the magnitude rounds away from zero with probability (the part
    dropped) / (the spacing of ``dtype`` there), so the expected result is ``x``. NaN stays NaN; a
    value past ``dtype``'s largest may round to infinity."""
    b = x.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if dtype == torch.bfloat16:
        out = sign | ((a + (bits & 0xFFFF)) >> 16)
        out = torch.where(a > 0x7F800000, sign | 0x7FC0, out)
        return _as_int16(out).view(torch.bfloat16)
    if dtype != torch.float16:
        raise ValueError(f"stochastic_round rounds to float16 or bfloat16, not {dtype}")
    e = a >> 23
    # fp16's normal range: 13 mantissa bits dropped, a carry moves into the exponent.
    t = (a + (bits & 0x1FFF)) >> 13
    normal = torch.where(t >= 143 << 10, 0x7C00, t - (112 << 10))
    # fp16 subnormals: m / 2^drop multiples of 2^-24.
    m = (a & 0x7FFFFF) | torch.where(e != 0, 0x800000, 0)
    drop = 126 - torch.where(e != 0, e, 1)  # 14 .. 125
    shift = drop.clamp(max=63)  # (1 << 63) - 1 wraps to 2^63 - 1: the mask C++ uses at 63
    mask = (torch.ones_like(shift) << shift) - 1
    up = ((bits & mask) < (m & mask)).long()
    subnormal = torch.where(drop >= 64, 0, (m >> shift) + up)
    out = sign | torch.where(e >= 113, normal, subnormal)
    out = torch.where(a >= 0x7F800000, sign | torch.where(a > 0x7F800000, 0x7E00, 0x7C00), out)
    return _as_int16(out).view(torch.float16)


def _engine_sum_of_squares(grads: torch.Tensor) -> torch.Tensor:
    """float32 ``[U]``: ``sum(g * g)`` per row in the engine's order (``sum_of_squares`` in
    csrc/embedding.cpp): four running partial sums, lane ``l`` adding ``g[4k + l]^2`` in turn,
    then ``(p0 + p1) + (p2 + p3)``, then the last ``D mod 4`` squares one by one."""
    squares = grads * grads
    dim = grads.shape[1]
    full = dim - dim % 4
    partial = grads.new_zeros(grads.shape[0], 4)
    for k in range(0, full, 4):
        partial = partial + squares[:, k : k + 4]
    total = (partial[:, 0] + partial[:, 1]) + (partial[:, 2] + partial[:, 3])
    for d in range(full, dim):
        total = total + squares[:, d]
    return total


def _adagrad_step(acc: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """int64 ``[U]``: row-wise Adagrad's "step" in the rounding bits: the new accumulator's bits
    in the upper 32 and ``sum_d bits(g[d]) * (2d + 1) mod 2^32`` in the lower (``gradient_fold``
    in csrc/embedding.cpp). The accumulator alone stops changing once ``mean(g^2)`` falls below
    half its ulp, and the bits would then repeat from one update to the next."""
    odd = torch.arange(1, 2 * grads.shape[1], 2, dtype=torch.int64, device=grads.device)
    fold = ((grads.contiguous().view(torch.int32).long() & 0xFFFFFFFF) * odd).sum(dim=1) & 0xFFFFFFFF
    acc_bits = acc.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    return (acc_bits << 32) | fold


@torch.no_grad()
def rowwise_adagrad_update_(
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    grads: torch.Tensor,
    config: RowwiseAdagrad,
    *,
    key: int = 0,
) -> None:
    """Apply row-wise Adagrad in place to ``weight [V, D]`` for ``rows [U]`` / ``grads [U, D]``;
    a half ``weight`` is rounded back stochastically (``key``: :func:`table_key` of its field)."""
    acc = state["sum"]
    if weight.dtype == torch.float32:
        acc[rows] += grads.pow(2).mean(dim=1)
        scale = config.lr / (acc[rows].sqrt() + config.eps)  # [U]
        weight[rows] -= scale[:, None] * grads
        return
    # The engine's arithmetic, operation for operation (the rounding must see the same float32).
    new_acc = acc[rows] + _engine_sum_of_squares(grads) / torch.tensor(float(grads.shape[1]))
    acc[rows] = new_acc
    scale = torch.tensor(config.lr, dtype=torch.float32) / (new_acc.sqrt() + config.eps)  # [U]
    updated = weight[rows].float() - scale[:, None] * grads
    bits = rounding_bits(config.seed, key, rows, _adagrad_step(new_acc, grads), grads.shape[1])
    weight[rows] = stochastic_round(updated, weight.dtype, bits)


@torch.no_grad()
def lazy_adam_update_(
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    grads: torch.Tensor,
    config: LazyAdam,
    *,
    key: int = 0,
) -> None:
    """Apply lazy Adam in place to ``weight [V, D]`` for ``rows [U]`` / ``grads [U, D]``; a half
    ``weight`` is rounded back stochastically (``key``: :func:`table_key` of its field)."""
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
    if weight.dtype == torch.float32:
        weight[rows] -= step_size[:, None] * m / denom
        return
    updated = weight[rows].float() - step_size[:, None] * m / denom
    bits = rounding_bits(config.seed, key, rows, step, grads.shape[1])
    weight[rows] = stochastic_round(updated, weight.dtype, bits)


def sparse_update_(
    weight: torch.Tensor,
    state: dict[str, torch.Tensor],
    rows: torch.Tensor,
    grads: torch.Tensor,
    config: FusedOptimizer,
    *,
    key: int = 0,
) -> None:
    """Dispatch to the update of ``config``'s algorithm (``key``: see the updates)."""
    if isinstance(config, RowwiseAdagrad):
        rowwise_adagrad_update_(weight, state, rows, grads, config, key=key)
    elif isinstance(config, LazyAdam):
        lazy_adam_update_(weight, state, rows, grads, config, key=key)
    else:
        raise TypeError(f"unknown fused optimizer {config!r}; use RowwiseAdagrad or LazyAdam")
