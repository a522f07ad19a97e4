"""``adapter_linear``: the fused adapter tower layer with backend resolution (DESIGN.md section 4).

Same signature as :func:`moefast.reference.adapter.adapter_linear` plus ``backend``.
"""

from __future__ import annotations

import torch

from moefast.ops._backend import Backend, BackendLike, resolve_backend
from moefast.reference import adapter as _reference
from moefast.reference.adapter import Activation

__all__ = ["adapter_linear"]


def _why_not_fast(x: torch.Tensor) -> str | None:
    return "the fused Triton kernels are not implemented yet"


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
    """``act((x W^T + b) * dropout_mask + sum_e g_e ((x A_e) B_e + c_e))``; see the reference."""
    chosen = resolve_backend("adapter_linear", _why_not_fast(x), explicit=backend)
    assert chosen is Backend.REFERENCE
    return _reference.adapter_linear(
        x, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain, expert=expert,
        dropout_mask=dropout_mask, activation=activation,
    )
