"""``adapter_linear``: the adapter tower layer with backend resolution (DESIGN.md section 4).

Same signature as :func:`moefast.reference.adapter.adapter_linear`, plus ``backend``.

Backends and what ``fast`` runs:

- ``reference``: the plain-PyTorch loop over experts, the specification
  (:func:`moefast.reference.adapter.adapter_linear`).
- ``fast`` on CUDA tensors (float32 or bfloat16, triton installed): the fused Triton kernels
  (:mod:`moefast.kernels.adapter_linear`) through the custom ops
  ``moefast::adapter_linear_fwd`` / ``moefast::adapter_linear_bwd``, registered with
  ``torch.library`` with fake implementations, so ``torch.compile`` traces them without graph
  breaks; eager calls go through :class:`AdapterLinearFunction`, which launches the same
  kernels with less dispatch overhead. Other dtypes on CUDA: ``auto`` takes the reference, an explicit
  ``fast`` raises.
- ``fast`` on CPU tensors: :func:`moefast.ops._adapter_cpu.adapter_linear_cpu`, the function of
  :func:`moefast.reference.adapter.adapter_linear_concat` (two products instead of a loop over
  experts) as one autograd node with a hand-written backward that folds the adapters' thin
  products into the layer's wide ones. ``auto`` picks it too.
- The Triton kernels on CPU tensors, through Triton's interpreter: only when both
  ``TRITON_INTERPRET=1`` and ``MOEFAST_TRITON_CPU=1`` are set, on float32 data (the interpreter
  mishandles bf16 products). This is how the test suite checks the kernels without a GPU; it is
  never chosen otherwise, so CPU models stay off the (slow) interpreter even in the tests,
  where conftest.py sets ``TRITON_INTERPRET=1`` for the whole session.

Import cost: nothing here imports triton; the kernels module is imported on the first fast call.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any

import torch

from moefast import precision
from moefast.ops._adapter_cpu import adapter_linear_cpu
from moefast.ops._backend import Backend, BackendLike, resolve_backend
from moefast.reference import adapter as _reference
from moefast.reference.adapter import Activation, check_adapter_inputs

__all__ = [
    "TRITON_CPU_ENV",
    "AdapterLinearFunction",
    "FastImpl",
    "adapter_linear",
    "fast_implementation",
    "why_not_fast",
]

_FAST_DTYPES = (torch.float32, torch.bfloat16)
TRITON_CPU_ENV = "MOEFAST_TRITON_CPU"


class FastImpl(enum.Enum):
    """What ``fast`` runs for one call."""

    TRITON = "triton"  # the fused kernels (compiled on CUDA, interpreted on CPU in tests)
    CONCAT = "concat"  # the CPU tower layer, the concatenated form (moefast.ops._adapter_cpu)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fast_implementation(x: torch.Tensor, bf16: bool = False) -> tuple[FastImpl | None, str | None]:
    """``(implementation, None)`` where ``fast`` can serve input ``x``, else ``(None, reason)``.

    ``bf16``: the call runs bf16-mixed (:mod:`moefast.precision`)."""
    if x.device.type == "cpu":
        if os.environ.get(TRITON_CPU_ENV, "0") in ("", "0"):
            return FastImpl.CONCAT, None
        if not _interpreting():
            return None, f"{TRITON_CPU_ENV}=1 runs the Triton kernels on CPU only with TRITON_INTERPRET=1"
        if x.dtype != torch.float32:
            return None, f"dtype {x.dtype} under the Triton interpreter (float32 only)"
        if bf16:
            return None, "precision bf16-mixed under the Triton interpreter (its bf16 products are wrong; float32 only)"
    elif x.device.type == "cuda":
        if x.dtype not in _FAST_DTYPES:
            return None, f"dtype {x.dtype} is not supported on CUDA (float32 or bfloat16)"
    else:
        return None, f"device {x.device} is not supported"
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    return FastImpl.TRITON, None


def why_not_fast(x: torch.Tensor) -> str | None:
    """None when ``fast`` can serve a call with input ``x``, else the reason it cannot."""
    return fast_implementation(x)[1]


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


def _kernels() -> ModuleType:
    """``moefast.kernels.adapter_linear``, imported on first use (it imports triton).

    Imported by name: mypy checks the kernels as the source folder ``kernels/``, which it
    cannot map onto ``moefast.kernels``.
    """
    return importlib.import_module("moefast.kernels.adapter_linear")


@torch.library.custom_op("moefast::adapter_linear_fwd", mutates_args=())
def _adapter_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_c: torch.Tensor,
    gate: torch.Tensor | None,
    domain: torch.Tensor | None,
    expert: int | None,
    dropout_mask: torch.Tensor | None,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``(y [N, out], u [N, V, r] fp32)``; see ``moefast.kernels.adapter_linear``."""
    return _kernels().adapter_linear_fwd(x, weight, bias, lora_A, lora_B, lora_c, gate, domain,
                                      expert, dropout_mask, relu)


def _visited_experts(lora_A: torch.Tensor, gate: torch.Tensor | None,
                     domain: torch.Tensor | None, expert: int | None) -> int:
    if gate is not None or domain is not None:
        return int(lora_A.shape[0])
    return 1 if expert is not None else 0


@_adapter_linear_fwd.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lora_A: torch.Tensor,
    lora_B: torch.Tensor, lora_c: torch.Tensor, gate: torch.Tensor | None,
    domain: torch.Tensor | None, expert: int | None, dropout_mask: torch.Tensor | None, relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    y = x.new_empty((n, weight.shape[0]))
    u = x.new_empty((n, _visited_experts(lora_A, gate, domain, expert), lora_A.shape[2]),
                    dtype=torch.float32)
    return y, u


@torch.library.custom_op("moefast::adapter_linear_bwd", mutates_args=())
def _adapter_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_c: torch.Tensor,
    gate: torch.Tensor | None,
    domain: torch.Tensor | None,
    expert: int | None,
    dropout_mask: torch.Tensor | None,
    relu: bool,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Fused backward: ``[dx, dW, db, dA, dB, dc, dg]``; an empty tensor where not needed."""
    flags = tuple(bool(f) for f in needs)
    assert len(flags) == 7
    grads = _kernels().adapter_linear_bwd(dy, x, y, u, weight, lora_A, lora_B, lora_c, gate,
                                       domain, expert, dropout_mask, relu,
                                       flags)
    return [g if g is not None else x.new_empty((0,)) for g in grads]


@_adapter_linear_bwd.register_fake
def _(
    dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
    lora_A: torch.Tensor, lora_B: torch.Tensor, lora_c: torch.Tensor,
    gate: torch.Tensor | None, domain: torch.Tensor | None, expert: int | None,
    dropout_mask: torch.Tensor | None, relu: bool, needs: list[bool],
) -> list[torch.Tensor]:
    likes = [x, weight, weight.new_empty((weight.shape[0],)), lora_A, lora_B, lora_c,
             gate if gate is not None else x.new_empty((0,))]
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if need
            else x.new_empty((0,)) for t, need in zip(likes, needs, strict=True)]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, _bias, lora_A, lora_B, lora_c, gate, domain, expert, dropout_mask, relu = inputs
    y, u = output
    ctx.save_for_backward(x, y, u, weight, lora_A, lora_B, lora_c, gate, domain, dropout_mask)
    ctx.expert = expert
    ctx.relu = relu


def _backward(ctx: Any, dy: torch.Tensor, _du: torch.Tensor | None) -> tuple[Any, ...]:
    """Gradients of ``y = act((x W^T + b) * m + sum_e g_e ((x A_e) B_e + c_e))``.

    With ``dz = dy * act'`` and ``u_e = x A_e``:
    ``dx = (dz * m) W + sum_e g_e (dz B_e^T) A_e^T``, ``dW = (dz * m)^T x``, ``db = sum_n dz * m``,
    ``dA_e = x^T (g_e * dz B_e^T)``, ``dB_e = (g_e u_e)^T dz``, ``dc_e = g_e^T dz``,
    ``dg_e = rowsum(u_e * (dz B_e^T)) + dz c_e^T``. The dropout mask, domain ids and the
    activation flag get no gradient; only the inputs that need one are computed.
    """
    x, y, u, weight, lora_A, lora_B, lora_c, gate, domain, dropout_mask = ctx.saved_tensors
    flags = [bool(f) for f in ctx.needs_input_grad[:6]] + [bool(ctx.needs_input_grad[6])]
    if not any(flags):
        return (None,) * 11
    grads = _adapter_linear_bwd(dy, x, y, u, weight, lora_A, lora_B, lora_c, gate, domain,
                                ctx.expert, dropout_mask, ctx.relu, flags)
    out: list[torch.Tensor | None] = [g if f else None for g, f in zip(grads, flags, strict=True)]
    return (*out, None, None, None, None)


torch.library.register_autograd("moefast::adapter_linear_fwd", _backward,
                                setup_context=_setup_context)


class AdapterLinearFunction(torch.autograd.Function):
    """The fused op for eager autograd: the same launchers and the same backward as the custom ops.

    Eager calls take this path because a ``torch.library`` custom op adds several times the
    Python dispatch cost of an ``autograd.Function`` per call (measured with empty bodies on the
    development machine), which matters at CTR sizes, where a layer's GPU work takes
    microseconds. Under ``torch.compile`` the custom ops are used instead (one opaque graph node
    each, with fake implementations). Backward: see ``_backward`` above.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        lora_c: torch.Tensor,
        gate: torch.Tensor | None,
        domain: torch.Tensor | None,
        expert: int | None,
        dropout_mask: torch.Tensor | None,
        relu: bool,
    ) -> torch.Tensor:
        y, u = _kernels().adapter_linear_fwd(x, weight, bias, lora_A, lora_B, lora_c, gate,
                                             domain, expert, dropout_mask, relu)
        ctx.save_for_backward(x, y, u, weight, lora_A, lora_B, lora_c, gate, domain, dropout_mask)
        ctx.expert = expert
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, y, u, weight, lora_A, lora_B, lora_c, gate, domain, dropout_mask = ctx.saved_tensors
        flags = tuple(bool(f) for f in ctx.needs_input_grad[:7])
        if not any(flags):
            return (None,) * 11
        grads = _kernels().adapter_linear_bwd(dy, x, y, u, weight, lora_A, lora_B, lora_c, gate,
                                              domain, ctx.expert, dropout_mask, ctx.relu, flags)
        return (*grads, None, None, None, None)


def _triton_bf16_mixed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lora_A: torch.Tensor,
    lora_B: torch.Tensor, lora_c: torch.Tensor, gate: torch.Tensor | None,
    domain: torch.Tensor | None, expert: int | None, dropout_mask: torch.Tensor | None, relu: bool,
) -> torch.Tensor:
    """bf16-mixed through the Triton kernels' bf16 path (float32 inputs, checked by the caller).

    The wide products' operands go to bf16: ``x``, ``W`` and ``A`` (the casts are autograd
    nodes, so the float32 master weights get float32 gradients). ``B``, ``b``, ``c``, the gate
    and the dropout mask stay float32: the kernels load them into float32 registers (the
    rank-space product ``(u g) B`` is then an fp32 product, as on CPU). The kernels write ``y``
    in x's dtype, bf16, which the next layer's wide product would round to anyway; it is
    returned as float32.
    """
    bf16 = precision.BF16
    y: torch.Tensor
    if torch.compiler.is_compiling():
        y, _ = _adapter_linear_fwd(x.to(bf16), weight.to(bf16), bias, lora_A.to(bf16), lora_B, lora_c,
                                   gate, domain, expert, dropout_mask, relu)
    else:
        y = AdapterLinearFunction.apply(x.to(bf16), weight.to(bf16), bias, lora_A.to(bf16), lora_B, lora_c,
                                        gate, domain, expert, dropout_mask, relu)
    return y.to(torch.float32)


# --------------------------------------------------------------------------------------------
# Functional entry point
# --------------------------------------------------------------------------------------------


def adapter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_c: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    domain: torch.Tensor | None = None,
    expert: int | None = None,
    dropout_mask: torch.Tensor | None = None,
    activation: Activation = Activation.RELU,
    backend: BackendLike = None,
) -> torch.Tensor:
    """``act((x W^T + b) * dropout_mask + sum_e g_e ((x A_e) B_e + c_e))``.

    Arguments, shapes and result as :func:`moefast.reference.adapter.adapter_linear`; see that
    docstring. ``backend``: ``"reference"``, ``"fast"``, ``"auto"`` or None (then
    ``MOEFAST_BACKEND``, then ``auto``); an explicit ``fast`` that cannot serve these inputs
    raises :class:`moefast.ops._backend.BackendUnavailableError` saying why.

    What ``fast`` runs depends on the device (module docstring). On the fast path on CUDA,
    domain ids are not range-checked (that would synchronise with the
    host); an id outside ``[0, E)`` selects no adapter.
    """
    bf16 = precision.bf16_mixed() and x.dtype == torch.float32
    impl, why_not = fast_implementation(x, bf16)
    chosen = resolve_backend("adapter_linear", why_not, explicit=backend)
    if chosen is Backend.REFERENCE:
        return _reference.adapter_linear(
            x, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain, expert=expert,
            dropout_mask=dropout_mask, activation=activation,
        )
    if impl is FastImpl.CONCAT:
        return adapter_linear_cpu(
            x, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain, expert=expert,
            dropout_mask=dropout_mask, activation=activation, bf16=bf16,
        )
    check_adapter_inputs(x, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain,
                         expert=expert, dropout_mask=dropout_mask, activation=activation,
                         check_values=x.device.type != "cuda")
    relu = activation is Activation.RELU
    if bf16:
        return _triton_bf16_mixed(x, weight, bias, lora_A, lora_B, lora_c, gate, domain, expert,
                                  dropout_mask, relu)
    if torch.compiler.is_compiling():
        y, _ = _adapter_linear_fwd(x, weight, bias, lora_A, lora_B, lora_c, gate, domain, expert,
                                   dropout_mask, relu)
        return y
    out: torch.Tensor = AdapterLinearFunction.apply(x, weight, bias, lora_A, lora_B, lora_c, gate,
                                                    domain, expert, dropout_mask, relu)
    return out
