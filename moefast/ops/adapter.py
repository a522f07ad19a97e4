"""``adapter_linear``: the adapter tower layer with backend resolution (DESIGN.md section 4).

Same signature as :func:`moefast.reference.adapter.adapter_linear`, plus ``backend``.

Backends:

- ``reference``: the plain-PyTorch loop over experts (:mod:`moefast.reference.adapter`).
- ``fast``: the fused Triton kernels (:mod:`moefast.kernels.adapter_linear`), through the custom
  ops ``moefast::adapter_linear_fwd`` / ``moefast::adapter_linear_bwd`` (registered with
  ``torch.library``, with fake implementations, so ``torch.compile`` traces them without graph
  breaks; the autograd formula is registered on the forward op and plays the role of the
  op's ``autograd.Function``).

Where the fast path applies:

- CUDA tensors of dtype float32 or bfloat16, with triton installed: ``auto`` picks it.
- CPU tensors run the Triton kernels only through Triton's interpreter, and only on an explicit
  ``fast`` request with ``TRITON_INTERPRET=1`` set and float32 data (the interpreter mishandles
  bf16 products). This exists for the test suite, which checks the kernels on CPU this way.
  ``auto`` never picks the interpreter, so a CPU model under ``auto`` stays on the reference
  path even where the tests set ``TRITON_INTERPRET=1``.

Import cost: nothing here imports triton; the kernels module is imported on the first fast call.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any

import torch

from moefast.ops._backend import Backend, BackendLike, requested_backend, resolve_backend
from moefast.reference import adapter as _reference
from moefast.reference.adapter import Activation, check_adapter_inputs

__all__ = ["adapter_linear", "why_not_fast"]

_FAST_DTYPES = (torch.float32, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not_fast(x: torch.Tensor, wanted: Backend = Backend.AUTO) -> str | None:
    """None when the fused Triton kernels can serve a call with input ``x``, else the reason.

    ``wanted`` is the requested backend: the interpreter on CPU serves explicit ``fast``
    requests only (see the module docstring).
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if x.device.type == "cuda":
        if x.dtype not in _FAST_DTYPES:
            return f"dtype {x.dtype} is not supported (float32 or bfloat16)"
        return None
    if x.device.type == "cpu":
        if not _interpreting():
            return ("the Triton kernels run on CUDA tensors; CPU tensors only through the "
                    "Triton interpreter (TRITON_INTERPRET=1)")
        if wanted is not Backend.FAST:
            return "the Triton interpreter on CPU is used only on an explicit fast request"
        if x.dtype != torch.float32:
            return f"dtype {x.dtype} under the Triton interpreter (float32 only)"
        return None
    return f"device {x.device} is not supported"


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

    On the fast path on CUDA, domain ids are not range-checked (that would synchronise with the
    host); an id outside ``[0, E)`` selects no adapter.
    """
    wanted = requested_backend(backend)
    chosen = resolve_backend("adapter_linear", why_not_fast(x, wanted), explicit=wanted)
    if chosen is Backend.REFERENCE:
        return _reference.adapter_linear(
            x, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain, expert=expert,
            dropout_mask=dropout_mask, activation=activation,
        )
    check_adapter_inputs(x, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain,
                         expert=expert, dropout_mask=dropout_mask, activation=activation,
                         check_values=x.device.type != "cuda")
    y, _ = _adapter_linear_fwd(
        x, weight, bias, lora_A, lora_B, lora_c, gate, domain,
        expert, dropout_mask,
        activation is Activation.RELU,
    )
    return y
