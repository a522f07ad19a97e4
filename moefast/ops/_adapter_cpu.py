"""The adapter tower layer on CPU: the concatenated form with a hand-written backward.

What ``backend="fast"`` runs for CPU tensors. It computes the function of
:func:`moefast.reference.adapter.adapter_linear_concat` (experts concatenated, two products
instead of a loop), as one autograd node instead of about seven, and folds the adapter's thin
products into the layer's wide ones, which BLAS runs several times more efficiently:

- forward: ``[x W^T | u] = x [W ; A_sel^T]^T``, one product giving the shared pre-activation
  (the bias is added to that part alone) and every visited expert's ``u = x A_e`` (``A_sel``
  is ``A_e`` for one expert, ``A_cat [in, E r]`` for the mixture; ``[W ; A_sel^T]`` stacks
  rows, so W is copied as stored); the mixture weights ``g_e u_e`` by broadcasting, with no
  ``[N, E r]`` copy of the gate;
- backward: ``dx = [dz*m | du] [W ; A_sel^T]``, one product for the shared and adapter paths;
  when ``W`` trains too, ``[dW ; dA_sel^T] = [dz*m | du]^T x`` is one product as well.

Only the gradients autograd asks for are computed: in an expert stage (backbone frozen) that is
``dA_e, dB_e, dc_e`` and ``dx``, never ``dW``. Gradients of the stacked ``lora_*`` tensors are
zero outside the visited experts, as autograd through the reference would give.
"""

from __future__ import annotations

from typing import Any

import torch

from moefast.precision import BF16, mm_bf16
from moefast.reference.adapter import Activation, check_adapter_inputs

__all__ = [
    "CpuAdapterLinearFunction", "adapter_linear_cpu", "layer_backward", "layer_forward", "routing_gate",
]


def routing_gate(lora_A: torch.Tensor, gate: torch.Tensor | None, domain: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """``[N, E]`` mixture weights in ``dtype`` (per-domain routing as a one-hot gate), or None."""
    if gate is not None:
        return gate.to(dtype)
    if domain is not None:
        return torch.nn.functional.one_hot(domain, lora_A.shape[0]).to(dtype)
    return None


def layer_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_c: torch.Tensor,
    g: torch.Tensor | None,
    expert: int | None,
    dropout_mask: torch.Tensor | None,
    relu: bool,
    bf16: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """One layer's output and what its backward needs (``g``: the mixture gate or None).

    ``bf16``: bf16-mixed (:mod:`moefast.precision`): the wide product ``x [W ; A_sel^T]^T``
    takes its operands in bf16 (:func:`moefast.precision.mm_bf16`, fp32 result), and ``x`` and
    ``[W ; A_sel^T]`` are saved in bf16 for backward; everything else is fp32.
    """
    num_experts, d_in, rank = lora_A.shape
    d_out = weight.shape[0]
    # The weights as rows, [W ; A_sel^T] ([out + V r, in]): W is copied as it is stored
    # (a transposed copy of W cost several times more), A_sel^T is small.
    if expert is not None:
        a_rows = lora_A[expert].T  # [r, in]
    elif g is not None:
        a_rows = lora_A.permute(0, 2, 1).reshape(num_experts * rank, d_in)  # [E r, in]
    else:
        a_rows = None
    n = x.shape[0]
    xs = x.to(BF16) if bf16 else x
    if a_rows is not None:
        w_rows = torch.cat([weight.to(BF16), a_rows.to(BF16)]) if bf16 else torch.cat([weight, a_rows])
        h = mm_bf16(xs, w_rows.T) if bf16 else x @ w_rows.T  # [x W^T | u]; the bias goes to the first part only, below
        z = torch.add(h[:, :d_out], bias)
        u = h[:, d_out:]  # [N, V r], a view of h
    elif bf16:
        w_rows = weight.to(BF16)
        z = mm_bf16(xs, w_rows.T).add_(bias)
        u = z.new_empty((n, 0))
    else:  # the shared layer alone: no copy of W
        w_rows = weight
        z = torch.addmm(bias, x, weight.T)
        u = z.new_empty((n, 0))
    if dropout_mask is not None:
        z.mul_(dropout_mask)
    ug = u
    if expert is not None:
        z.addmm_(u, lora_B[expert]).add_(lora_c[expert])
    elif g is not None:
        ug = (u.view(n, num_experts, rank) * g[:, :, None]).view(n, num_experts * rank)  # g_e u_e
        z.addmm_(ug, lora_B.reshape(num_experts * rank, d_out)).addmm_(g, lora_c)
    y = z.relu_() if relu else z
    return y, [xs, y, u, ug, w_rows, lora_B, lora_c, g, dropout_mask]


def layer_backward(
    saved: list[torch.Tensor | None],
    dy: torch.Tensor,
    expert: int | None,
    relu: bool,
    num_experts: int,
    rank: int,
    needs: tuple[bool, ...],
    gate_grad: bool,
    bf16: bool = False,
) -> list[torch.Tensor | None]:
    """``[dx, dW, db, dA, dB, dc, dg]`` of one layer, None where ``needs`` (7 flags) says no.

    With ``dz = dy * act'``: ``dx = [dz m | du] [W ; A_sel^T]``, ``dW = (dz m)^T x``,
    ``db = sum_n dz m``, ``dA_e = x^T du_e``, ``dB_e = (g_e u_e)^T dz``, ``dc_e = g_e^T dz``,
    ``dg_e = rowsum(u_e * (dz B_e^T)) + dz c_e^T``, with ``du_e = g_e (dz B_e^T)``.
    ``gate_grad``: ``dg`` is wanted (False under domain routing, whose gate is a one-hot).
    ``bf16``: the forward ran bf16-mixed; the products reading ``x`` or ``[W ; A_sel^T]``
    (``dx``, ``dW``, ``dA``) take ``d`` in bf16, with fp32 results.
    """
    x, y, u, ug, w_rows, lora_B, lora_c, g, mask = saved
    assert x is not None and y is not None and u is not None and ug is not None and w_rows is not None
    assert lora_B is not None and lora_c is not None
    need_x, need_w, need_b, need_a, need_bb, need_c, need_g = needs
    n, d_in = x.shape
    d_out = lora_B.shape[2]
    width = u.shape[1]
    dz = torch.ops.aten.threshold_backward(dy, y, 0) if relu else dy.contiguous()
    adapter = expert is not None or g is not None
    # d = [dz * m | du]: the gradient at [z | u], written into one buffer. Its first part feeds
    # dx, dW and db only: a first layer in an expert or gate stage (nothing below it trains)
    # skips that pass.
    d = dz.new_empty((n, d_out + width))
    if need_x or need_w or need_b:
        if mask is not None:
            torch.mul(dz, mask, out=d[:, :d_out])
        else:
            d[:, :d_out] = dz
    grad_A = grad_B = grad_c = grad_g = None
    if adapter and (need_x or need_a or need_g):
        if expert is not None:
            torch.mm(dz, lora_B[expert].T, out=d[:, d_out:])  # du = dz B_e^T
        else:
            assert g is not None
            b_cat = lora_B.reshape(num_experts * rank, d_out)
            dug = (dz @ b_cat.T).view(n, num_experts, rank)  # dz B_e^T for every e
            if need_g and gate_grad:
                grad_g = (u.view(n, num_experts, rank) * dug).sum(-1).addmm_(dz, lora_c.T)
            torch.mul(dug, g[:, :, None], out=d[:, d_out:].view(n, num_experts, rank))
    du = d[:, d_out:]
    dzm = d[:, :d_out]
    grad_w = grad_b = None
    da_sel_t: torch.Tensor | None
    if bf16:  # the same products, their d operand in bf16 (only the part each one reads)
        ds = d.to(BF16) if need_x or (need_w and need_a and adapter) else None
        grad_x = mm_bf16(ds, w_rows) if ds is not None and need_x else None
        if ds is not None and need_w and need_a and adapter:
            gw = mm_bf16(ds.T, x)
            grad_w, da_sel_t = gw[:d_out], gw[d_out:]
        else:
            if need_w:
                grad_w = mm_bf16((ds[:, :d_out] if ds is not None else dzm.to(BF16)).T, x)
            da_sel_t = (mm_bf16((ds[:, d_out:] if ds is not None else du.to(BF16)).T, x)
                        if need_a and adapter else None)
    else:
        grad_x = d @ w_rows if need_x else None  # [N, in]
        # Weight gradients as d^T x ([out + V r, in]): BLAS runs this orientation about 3x
        # faster than x^T d for the thin adapter columns (N = 1024 rows, r = 8: 65 us against 190 us).
        if need_w and need_a and adapter:
            gw = d.T @ x  # [dW ; dA_sel^T] in one product
            grad_w, da_sel_t = gw[:d_out], gw[d_out:]
        else:
            if need_w:
                grad_w = dzm.T @ x
            da_sel_t = du.T @ x if need_a and adapter else None  # [V r, in]
    if need_b:
        grad_b = dzm.sum(0)
    if need_a and da_sel_t is not None:
        grad_A = torch.zeros((num_experts, d_in, rank), dtype=lora_B.dtype)
        if expert is not None:
            grad_A[expert] = da_sel_t.T
        else:
            grad_A.copy_(da_sel_t.view(num_experts, rank, d_in).transpose(1, 2))
    if need_bb and adapter:
        if expert is not None:
            grad_B = torch.zeros_like(lora_B)
            torch.mm(u.T, dz, out=grad_B[expert])
        else:
            grad_B = (ug.T @ dz).view(num_experts, rank, d_out)
    if need_c and adapter:
        if expert is not None:
            grad_c = torch.zeros_like(lora_c)
            grad_c[expert] = dz.sum(0)
        else:
            assert g is not None
            grad_c = g.T @ dz
    return [grad_x, grad_w, grad_b, grad_A, grad_B, grad_c, grad_g]


class CpuAdapterLinearFunction(torch.autograd.Function):
    """``y = act((x W^T + b) * m + sum_e g_e ((x A_e) B_e + c_e))``; see the module docstring."""

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
        bf16: bool = False,
    ) -> torch.Tensor:
        g = routing_gate(lora_A, gate, domain, x.dtype)
        y, saved = layer_forward(x, weight, bias, lora_A, lora_B, lora_c, g, expert, dropout_mask, relu, bf16)
        ctx.save_for_backward(*saved)
        ctx.expert, ctx.relu, ctx.bf16 = expert, relu, bf16
        ctx.num_experts, ctx.rank = lora_A.shape[0], lora_A.shape[2]
        ctx.gate_grad = gate is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = layer_backward(list(ctx.saved_tensors), dy, ctx.expert, ctx.relu, ctx.num_experts,
                               ctx.rank, tuple(ctx.needs_input_grad[:7]), ctx.gate_grad, ctx.bf16)
        return (*grads, None, None, None, None, None)


def adapter_linear_cpu(
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
    bf16: bool = False,
) -> torch.Tensor:
    """Arguments and result as :func:`moefast.reference.adapter.adapter_linear`; ``bf16``:
    bf16-mixed (float32 tensors only; see :func:`layer_forward`)."""
    check_adapter_inputs(x, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain,
                         expert=expert, dropout_mask=dropout_mask, activation=activation)
    out: torch.Tensor = CpuAdapterLinearFunction.apply(
        x, weight, bias, lora_A, lora_B, lora_c, gate, domain, expert, dropout_mask,
        activation is Activation.RELU, bf16 and x.dtype == torch.float32,
    )
    return out
