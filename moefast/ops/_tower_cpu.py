"""The whole adapter tower on CPU as one autograd node: what ``Tower`` runs under ``fast``.

The tower is its hidden layers (each the function of :mod:`moefast.ops._adapter_cpu`, ReLU)
followed by ``Linear(last, 1)``. The per-layer path pays, for every hidden layer, a module call,
the input checks, an autograd node and a backward call from the engine, and for the output layer
three more nodes (``addmm``, ``t``, ``squeeze``). At CTR sizes that fixed cost is a large part of
a step (a ``paper`` expert step at batch 8 takes about 0.75 ms, almost all of it dispatch), so
the fast backend runs the tower as one node: the same layer arithmetic in the same order
(:func:`~moefast.ops._adapter_cpu.layer_forward` / :func:`~moefast.ops._adapter_cpu.layer_backward`),
with the checks done once and the backward walking the layers top-down itself.

Results equal the per-layer path's: the forward bit for bit (tested), the gradients to float32
rounding (the output layer's weight gradient is one ``[1, N] x [N, last]`` product here and
autograd's ``addmm`` backward there). The backward stops at the lowest layer anything below
still needs: in an expert or gate stage (backbone frozen) the first layer computes no ``dx``.

What runs is the same node in C++ (``torch.ops.moefast.tower``, ``csrc/ops/tower.cpp``, built as
``moefast._tower_ops`` against libtorch): the same ATen calls in the same order, so it equals
:class:`CpuTowerFunction` bit for bit, forward and backward (tested), without the Python around
each call, about 0.1 ms of a ``paper`` training step. :class:`CpuTowerFunction` is its readable
specification, and what runs when ``moefast._tower_ops`` is not built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moefast import _ext
from moefast.ops._adapter_cpu import layer_backward, layer_forward, routing_gate
from moefast.reference.adapter import Activation, check_adapter_inputs

__all__ = ["CpuTowerFunction", "LayerParams", "tower_cpu"]

LayerParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""One hidden layer's ``(weight, bias, lora_A, lora_B, lora_c)``."""

_PER_LAYER = 5  # tensors per hidden layer in the flat parameter list
_SAVED_PER_LAYER = 9  # what layer_forward saves per layer


class CpuTowerFunction(torch.autograd.Function):
    """``logit = Linear(relu_layers(x))`` for one routing; see the module docstring.

    ``apply(x, gate, domain, expert, masks, bf16, *params)``: ``masks`` a tuple with one
    dropout mask (or None) per hidden layer; ``bf16`` bf16-mixed (:mod:`moefast.precision`: every
    layer's wide products with bf16 operands); ``params`` every hidden layer's five tensors, then
    the output layer's ``weight [1, last]`` and ``bias [1]``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        gate: torch.Tensor | None,
        domain: torch.Tensor | None,
        expert: int | None,
        masks: tuple[torch.Tensor | None, ...],
        bf16: bool,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        num_layers = len(masks)
        g = routing_gate(params[2], gate, domain, x.dtype)
        saved: list[torch.Tensor | None] = []
        h = x
        for k in range(num_layers):
            weight, bias, lora_A, lora_B, lora_c = params[_PER_LAYER * k : _PER_LAYER * (k + 1)]
            h, layer_saved = layer_forward(h, weight, bias, lora_A, lora_B, lora_c, g, expert,
                                           masks[k], True, bf16)
            saved.extend(layer_saved)
        out_weight, out_bias = params[-2], params[-1]
        logit = torch.addmm(out_bias, h, out_weight.T).view(-1)
        ctx.save_for_backward(*saved, h, out_weight)
        ctx.expert, ctx.num_layers, ctx.gate_grad, ctx.bf16 = expert, num_layers, gate is not None, bf16
        return logit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dlogit: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        num_layers = ctx.num_layers
        need_input, need_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_params = ctx.needs_input_grad[6:]
        grads: list[torch.Tensor | None] = [None] * len(need_params)
        h_last, out_weight = saved[-2], saved[-1]
        dlogit = dlogit.contiguous()
        if need_params[-2]:
            grads[-2] = dlogit[None, :] @ h_last  # [1, last]
        if need_params[-1]:
            grads[-1] = dlogit.sum(0, keepdim=True)
        dy: torch.Tensor | None = dlogit[:, None] * out_weight  # [N, last]
        grad_gate: torch.Tensor | None = None
        for k in reversed(range(num_layers)):
            assert dy is not None
            # dx of layer k feeds everything below it: the input, lower layers, their gate use.
            below = need_input or (k > 0 and (need_gate or any(need_params[: _PER_LAYER * k])))
            own = tuple(need_params[_PER_LAYER * k : _PER_LAYER * (k + 1)])
            layer_saved = list(saved[_SAVED_PER_LAYER * k : _SAVED_PER_LAYER * (k + 1)])
            num_experts, rank = layer_saved[5].shape[:2]  # lora_B [E, r, out]
            layer_grads = layer_backward(layer_saved, dy, ctx.expert, True, num_experts, rank,
                                         (below, *own, need_gate), ctx.gate_grad, ctx.bf16)
            grads[_PER_LAYER * k : _PER_LAYER * (k + 1)] = layer_grads[1:6]
            if layer_grads[6] is not None:
                grad_gate = layer_grads[6] if grad_gate is None else grad_gate.add_(layer_grads[6])
            dy = layer_grads[0]
            if dy is None and not need_gate:
                break  # nothing below this layer wants a gradient
        return (dy if need_input else None, grad_gate, None, None, None, None, *grads)


def tower_cpu(
    x: torch.Tensor,
    layers: Sequence[LayerParams],
    output_weight: torch.Tensor,
    output_bias: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    domain: torch.Tensor | None = None,
    expert: int | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """Logits ``[N]`` of ReLU adapter layers ``layers`` then ``Linear(output_weight, output_bias)``.

    Routing (at most one of ``gate``, ``domain``, ``expert``) and ``masks`` (one dropout mask or
    None per layer) as :func:`moefast.ops.adapter_linear` takes them for every layer. Inputs are
    checked like the per-layer op's; the domain ids once. ``bf16``: bf16-mixed
    (:mod:`moefast.precision`), for float32 inputs.
    """
    if not layers:
        raise ValueError("a tower needs at least one hidden layer")
    masks = tuple(masks) if masks is not None else (None,) * len(layers)
    if len(masks) != len(layers):
        raise ValueError(f"{len(masks)} dropout masks for {len(layers)} layers")
    layer_input = x
    for k, (weight, bias, lora_A, lora_B, lora_c) in enumerate(layers):
        check_adapter_inputs(layer_input, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain,
                             expert=expert, dropout_mask=masks[k], activation=Activation.RELU,
                             check_values=k == 0)
        # What the next layer gets, for its checks: shape, dtype and device, no data.
        layer_input = x.new_empty((1, 1)).expand(x.shape[0], weight.shape[0])
    width = layer_input.shape[1]
    if output_weight.shape != (1, width) or output_bias.shape != (1,):
        raise ValueError(f"the output layer must be Linear({width}, 1), got weight "
                         f"{tuple(output_weight.shape)} and bias {tuple(output_bias.shape)}")
    for name, t in (("output weight", output_weight), ("output bias", output_bias)):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"the {name} is {t.dtype} on {t.device}; x is {x.dtype} on {x.device}")
    params = [t for layer in layers for t in layer]
    params += [output_weight, output_bias]
    bf16 = bf16 and x.dtype == torch.float32
    if _ext.tower_op_available():
        native: torch.Tensor = _ext.tower_op()(x, gate, domain, params, expert, list(masks), bf16)
        return native
    out: torch.Tensor = CpuTowerFunction.apply(x, gate, domain, expert, masks, bf16, *params)
    return out
