"""bf16 mixed precision: the one switch every moefast layer reads (DESIGN.md section 14).

``bf16-mixed`` (:class:`moefast.config.Precision`) is defined here, once, as arithmetic:

- a *wide product* ``a @ b`` rounds both operands to bfloat16, multiplies them exactly (a
  product of two bf16 numbers fits a float32) and accumulates in float32, with a float32
  result; forward and backward alike (``da = round(g) @ round(b)^T``, ``db = round(a)^T @
  round(g)``);
- everything else stays float32: the rank-space intermediate ``u = x A``, the gate weights, the
  adapter sum ``(g u) B + g c``, biases, activations, the loss, the master weights and the
  optimizer state.

Which products are wide: in the tower, every product that reads a layer's input ``x`` or its
stacked weights ``[W ; A_sel^T]`` (forward ``[x W^T | x A]``, backward ``dx``, ``dW``, ``dA``);
the products in rank space (``B``, ``c``, the gate) stay float32, as does the ``Linear(last, 1)``
output (a matrix-vector product). In the interaction parts, every product with a learned weight
(:func:`wide_matmul`, :func:`wide_linear`): DCN's cross kernels, xDeepFM's CIN convolutions,
AutoInt's projections, FiBiNET's SENET and bilinear weights, and each backbone's output vector.

The switch is a process-wide setting, set by :func:`autocast` (``with moefast.precision.autocast(
"bf16-mixed"): ...``, what a training step under ``TrainConfig.precision`` runs its forward in,
:func:`moefast.train.loop.step_precision`). Layers decide at forward time and keep what their
backward needs (bf16 operands) in their autograd nodes, so backward needs no context. Outside
any block the precision is ``fp32``, and fp32 runs the same torch calls as before the option
existed (bitwise the same results).

Where the products run:

- the reference path (:func:`wide_matmul`, :class:`WideProduct`): explicit casts,
  ``round(a) @ round(b)`` in float32: the specification;
- the fast CPU path: ``torch.ops.moefast.mm_bf16`` (bf16 operands, fp32 accumulation, a
  float32 tensor), defined by the C++ module ``moefast._tower_ops`` or, without it, here. Where
  the CPU has bf16 units it runs torch's bf16 GEMM (oneDNN), which accumulates in fp32 but stores
  its result in bf16: one more rounding than the reference, half a bf16 ulp per result, inside
  the bound the tests hold it to (:func:`moefast.testing.wide_product_bound`); torch's CPU build
  has no bf16 GEMM with a float32 result. Elsewhere it is the reference's function exactly (the
  float32 product of the bf16 operands), at float32 speed;
- CUDA: the Triton kernels' bf16 path (:mod:`moefast.ops.adapter`).

A CPU without ``avx512_bf16`` or AMX computes the same function, only slowly: one warning per
process names the missing flag (:func:`check_cpu`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moefast.config import Precision

__all__ = [
    "BF16",
    "Precision",
    "PrecisionWarning",
    "WideProduct",
    "autocast",
    "bf16_mixed",
    "check_cpu",
    "check_device",
    "current",
    "mm_bf16",
    "parse_precision",
    "round_bf16",
    "wide_linear",
    "wide_matmul",
]

BF16 = torch.bfloat16

# The precision in force: a plain module global (set and restored by ``autocast``), not a
# ContextVar, because torch.compile cannot trace ContextVar.get (a graph break) while it traces
# a global's value under a guard. One per process, like the training step that sets it.
_CURRENT: list[Precision] = [Precision.FP32]


class PrecisionWarning(UserWarning):
    """``bf16-mixed`` runs here without the CPU's bf16 units (same results, slower)."""


def parse_precision(value: Precision | str) -> Precision:
    """``Precision`` from an enum member or its value; ``ValueError`` naming a bad value."""
    if isinstance(value, Precision):
        return value
    try:
        return Precision(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(p.value for p in Precision)
        raise ValueError(f"unknown precision {value!r} (TrainConfig.precision, --precision); choose one of {choices}") from None


def current() -> Precision:
    """The precision moefast layers compute in here (``fp32`` outside :func:`autocast`)."""
    return _CURRENT[0]


def bf16_mixed() -> bool:
    """Whether layers called here compute their wide products with bf16 operands."""
    return _CURRENT[0] is Precision.BF16_MIXED


@contextlib.contextmanager
def autocast(precision: Precision | str) -> Iterator[None]:
    """Inside this block, moefast layers compute in ``precision`` (see the module docstring).

    Unlike ``torch.autocast``, it rounds only the wide products' operands and returns float32:
    outputs, gradients and parameters keep their dtype.
    """
    previous = _CURRENT[0]
    _CURRENT[0] = parse_precision(precision)
    try:
        yield
    finally:
        _CURRENT[0] = previous


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16 (round to nearest even) and back to float32."""
    return t.to(BF16).to(torch.float32)


# --------------------------------------------------------------------------------------------
# The reference: explicit casts
# --------------------------------------------------------------------------------------------


class WideProduct(torch.autograd.Function):
    """``torch.matmul(a, b)`` under bf16-mixed: operands rounded to bf16 forward and backward,
    products and accumulation in float32, float32 results and gradients.

    Backward, with ``g`` the incoming gradient: ``da = round(g) round(b)^T``,
    ``db = round(a)^T round(g)``, summed over broadcast dimensions as ``torch.matmul``'s own
    backward does (computed by autograd through the float32 product of the rounded operands).
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a_r, b_r = round_bf16(a), round_bf16(b)
        ctx.save_for_backward(a_r, b_r)
        return torch.matmul(a_r, b_r)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a_r, b_r = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            a_v = a_r.detach().requires_grad_(need_a)
            b_v = b_r.detach().requires_grad_(need_b)
            inputs = [t for t, need in ((a_v, need_a), (b_v, need_b)) if need]
            grads = list(torch.autograd.grad(torch.matmul(a_v, b_v), inputs, round_bf16(grad)))
        return (grads.pop(0) if need_a else None, grads.pop(0) if need_b else None)


def wide_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)``; under bf16-mixed a :class:`WideProduct`. In fp32 this is exactly
    ``a @ b`` (the same torch call)."""
    if _CURRENT[0] is Precision.BF16_MIXED and a.dtype == torch.float32:
        out: torch.Tensor = WideProduct.apply(a, b)
        return out
    return a @ b


def wide_linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """``linear(x)``; under bf16-mixed ``x W^T`` as a :class:`WideProduct`, plus the float32 bias."""
    if _CURRENT[0] is Precision.BF16_MIXED and x.dtype == torch.float32:
        y: torch.Tensor = WideProduct.apply(x, linear.weight.T)
        return y if linear.bias is None else y + linear.bias
    out: torch.Tensor = linear(x)
    return out


# --------------------------------------------------------------------------------------------
# The fast path's primitive: torch.ops.moefast.mm_bf16
# --------------------------------------------------------------------------------------------

_LIBRARY: torch.library.Library | None = None


def _mm_bf16_plain(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The float32 product of the bf16 operands (exact products, float32 accumulation)."""
    return torch.mm(a.to(torch.float32), b.to(torch.float32))


def _mm_bf16_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``moefast::mm_bf16`` on CPU as ``csrc/ops/tower.cpp`` computes it: torch's bf16 GEMM
    (oneDNN, fp32 accumulation, result stored in bf16) where the CPU has bf16 units, else
    :func:`_mm_bf16_plain`."""
    if missing_bf16_flag(cpu_flags()) is None:
        return torch.mm(a, b).to(torch.float32)
    return _mm_bf16_plain(a, b)


def _mm_bf16_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # torch's bf16 GEMM with a float32 result where this torch has it (cuBLAS accumulates in fp32).
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return _mm_bf16_plain(a, b)


@functools.cache
def _mm_bf16_op() -> Any:
    """``torch.ops.moefast.mm_bf16``: from ``moefast._tower_ops`` when it is built (MKL's bf16
    GEMM on CPU), else defined here with :func:`_mm_bf16_plain`. Its CUDA kernel is added here."""
    global _LIBRARY
    from moefast import _ext

    _ext.tower_op_available(warn=False)  # loads moefast._tower_ops where it can
    if not hasattr(torch.ops.moefast, "mm_bf16"):
        _LIBRARY = torch.library.Library("moefast", "FRAGMENT")
        _LIBRARY.define("mm_bf16(Tensor a, Tensor b) -> Tensor")
        _LIBRARY.impl("mm_bf16", _mm_bf16_cpu, "CPU")
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("moefast", "IMPL")
    _LIBRARY.impl("mm_bf16", _mm_bf16_cuda, "CUDA")
    return torch.ops.moefast.mm_bf16.default


def mm_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for bfloat16 ``a [m, k]``, ``b [k, n]`` (any strides), float32 ``[m, n]``
    accumulated in float32 (``torch.ops.moefast.mm_bf16``). No autograd: the fast nodes call it
    inside their own backward."""
    out: torch.Tensor = _mm_bf16_op()(a, b)
    return out


# --------------------------------------------------------------------------------------------
# What serves bf16-mixed where
# --------------------------------------------------------------------------------------------

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_warned = False


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (None where that file is unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def missing_bf16_flag(flags: frozenset[str] | None) -> str | None:
    """The flag a CPU lacks for fast bf16 products (None when it has one of them)."""
    if flags is None or any(f in flags for f in _BF16_FLAGS):
        return None
    return "avx512_bf16"


def check_cpu(flags: frozenset[str] | None = None) -> str | None:
    """Warn once per process (:class:`PrecisionWarning`, one line) when this CPU has neither
    ``avx512_bf16`` nor ``amx_bf16``: bf16-mixed computes the same function there, slowly.
    Returns the warning's text, or None."""
    global _warned
    missing = missing_bf16_flag(cpu_flags() if flags is None else flags)
    if missing is None:
        return None
    text = (f"moefast: bf16-mixed on a CPU without {missing} (nor amx_bf16): the same results, "
            "computed without bf16 units (slower than fp32)")
    if not _warned:
        _warned = True
        warnings.warn(text, PrecisionWarning, stacklevel=2)
    return text


def check_device(precision: Precision | str, device: torch.device | str) -> Precision:
    """``precision`` for training on ``device``, or ``ValueError`` naming the option when no
    backend serves it there. ``bf16-mixed`` is served on CPU (warning without bf16 units, see
    :func:`check_cpu`) and on CUDA devices that support bfloat16."""
    chosen = parse_precision(precision)
    if chosen is Precision.FP32:
        return chosen
    dev = torch.device(device)
    if dev.type == "cpu":
        check_cpu()
        return chosen
    if dev.type == "cuda":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--precision {chosen.value} (TrainConfig.precision): the CUDA device "
                             f"{torch.cuda.get_device_name(dev)} has no bfloat16 support; use fp32")
        return chosen
    raise ValueError(f"--precision {chosen.value} (TrainConfig.precision): no backend serves it on "
                     f"{dev.type} devices; use fp32")
