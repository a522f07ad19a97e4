"""The adapter tower layer of MLoRA / MoE-MLoRA in plain PyTorch: the specification.

One layer computes (DESIGN.md sections 2 and 4)::

    y = act((x W^T + b) * dropout_mask + sum_e g[:, e] * ((x A_e) B_e + c_e))

with ``x [N, in]``, ``W [out, in]`` (``torch.nn.Linear`` layout), ``b [out]``, experts stacked as
``A [E, in, r]``, ``B [E, r, out]``, ``c [E, out]``, and one of three routings:

- ``gate [N, E]`` float: per-sample expert weights (MoE-MLoRA, the gate stage);
- ``domain [N]`` int64: adapter ``e = domain[n]`` for row ``n`` (MLoRA; the one-hot gate);
- ``expert`` int: one active expert for every row (the expert stage of MoE-MLoRA);
- none of them: the base layer only (the backbone stage).

``dropout_mask`` is ``[N, out]`` in x's dtype, holding 0 or ``1 / (1 - p)``: exactly the factor
``torch.nn.functional.dropout`` multiplies by, drawn by the caller (``moefast.nn.AdapterLinear``
draws it in training mode). Passing the mask, not ``p``, makes the op deterministic and lets
every backend compute the same function from the same inputs. Dropout touches the shared path
only, before the adapter term is added, as the seeds do.

Two forms of the same function live here:

- :func:`adapter_linear`: the seeds' form, a loop over experts. Written for reading; it is the
  executable specification that the fused Triton kernel (``moefast.kernels.adapter_linear``)
  is tested against.
- :func:`adapter_linear_concat`: the strongest plain-PyTorch form, experts concatenated
  (``A_cat [in, E r]``, ``B_cat [E r, out]``), two matrix products and one elementwise gate. It is
  the peer the fast path must beat in ``bench/test_bench_adapter.py``.
"""

from __future__ import annotations

import enum

import torch

from moefast.precision import wide_matmul

__all__ = ["Activation", "adapter_linear", "adapter_linear_concat", "check_adapter_inputs", "check_domain_ids"]


class Activation(enum.Enum):
    """The layer's activation: ReLU for hidden tower layers, NONE for a linear layer."""

    RELU = "relu"
    NONE = "none"


def _apply_activation(z: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation is Activation.RELU:
        return torch.relu(z)
    return z


def check_domain_ids(domain: torch.Tensor, bound: int, owner: str) -> None:
    """``ValueError`` naming the first out-of-range id unless every id lies in ``[0, bound)``
    (``owner`` says what the bound counts). Reads the ids: on CUDA that synchronises."""
    if domain.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(domain))
    if low < 0 or high >= bound:
        bad = low if low < 0 else high
        raise ValueError(f"domain id {bad} is outside [0, {bound}) ({owner})")


def check_adapter_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_c: torch.Tensor,
    *,
    gate: torch.Tensor | None,
    domain: torch.Tensor | None,
    expert: int | None,
    dropout_mask: torch.Tensor | None,
    activation: Activation,
    check_values: bool = True,
) -> None:
    """Validate shapes, dtypes and routing; ``ValueError`` / ``TypeError`` naming the bad value.

    ``check_values`` also checks that every domain id lies in ``[0, E)``; that reads the ids,
    which on a CUDA tensor forces a host synchronisation, so the fast path skips it on CUDA.
    """
    if not isinstance(activation, Activation):
        raise TypeError(f"activation must be an Activation, got {activation!r}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be [N, in], got shape {tuple(x.shape)}")
    n, d_in = x.shape
    if weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(f"weight must be [out, {d_in}], got shape {tuple(weight.shape)}")
    d_out = weight.shape[0]
    if bias.shape != (d_out,):
        raise ValueError(f"bias must be [{d_out}], got shape {tuple(bias.shape)}")
    if lora_A.dim() != 3 or lora_A.shape[1] != d_in:
        raise ValueError(f"lora_A must be [E, {d_in}, r], got shape {tuple(lora_A.shape)}")
    e, _, r = lora_A.shape
    if lora_B.shape != (e, r, d_out):
        raise ValueError(f"lora_B must be [{e}, {r}, {d_out}], got shape {tuple(lora_B.shape)}")
    if lora_c.shape != (e, d_out):
        raise ValueError(f"lora_c must be [{e}, {d_out}], got shape {tuple(lora_c.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B),
                    ("lora_c", lora_c)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, x has {x.dtype}; they must match")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x is on {x.device}")
    routings = [name for name, v in (("gate", gate), ("domain", domain), ("expert", expert))
                if v is not None]
    if len(routings) > 1:
        raise ValueError(f"pass at most one of gate, domain, expert; got {', '.join(routings)}")
    if gate is not None:
        if not gate.is_floating_point():
            raise TypeError(f"gate must be a floating-point tensor, got dtype {gate.dtype}")
        if gate.shape != (n, e):
            raise ValueError(f"gate must be [{n}, {e}], got shape {tuple(gate.shape)}")
        if gate.device != x.device:
            raise ValueError(f"gate is on {gate.device}, x is on {x.device}")
    if domain is not None:
        if domain.dtype != torch.int64:
            raise TypeError(f"domain must be an int64 tensor, got dtype {domain.dtype}")
        if domain.shape != (n,):
            raise ValueError(f"domain must be [{n}], got shape {tuple(domain.shape)}")
        if domain.device != x.device:
            raise ValueError(f"domain is on {domain.device}, x is on {x.device}")
        if check_values:
            check_domain_ids(domain, e, f"the layer has {e} adapters")
    if expert is not None:
        if isinstance(expert, bool) or not isinstance(expert, int):
            raise TypeError(f"expert must be an int, got {expert!r}")
        if not 0 <= expert < e:
            raise ValueError(f"expert {expert} is outside [0, {e}) (the layer has {e} experts)")
    if dropout_mask is not None:
        if dropout_mask.shape != (n, d_out):
            raise ValueError(
                f"dropout_mask must be [{n}, {d_out}], got shape {tuple(dropout_mask.shape)}"
            )
        if dropout_mask.dtype != x.dtype:
            raise TypeError(f"dropout_mask has dtype {dropout_mask.dtype}, x has {x.dtype}")
        if dropout_mask.device != x.device:
            raise ValueError(f"dropout_mask is on {dropout_mask.device}, x is on {x.device}")


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
) -> torch.Tensor:
    """The seeds' form: ``act((x W^T + b) * mask + sum_e g_e ((x A_e) B_e + c_e))``, expert by expert.

    Args:
        x: ``[N, in]`` float.
        weight, bias: ``[out, in]``, ``[out]`` (the ``torch.nn.Linear`` layout), x's dtype.
        lora_A, lora_B, lora_c: ``[E, in, r]``, ``[E, r, out]``, ``[E, out]``, x's dtype.
        gate: ``[N, E]`` float per-sample expert weights, or
        domain: ``[N]`` int64 ids in ``[0, E)`` (row n uses adapter ``domain[n]``), or
        expert: one active expert for every row; none of the three: the base layer alone.
        dropout_mask: ``[N, out]`` in x's dtype (0 or ``1/(1-p)``), or None for no dropout.
        activation: ReLU (hidden layers) or NONE.

    Returns:
        ``[N, out]`` in x's dtype.
    """
    check_adapter_inputs(x, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain,
                         expert=expert, dropout_mask=dropout_mask, activation=activation)
    # Under bf16-mixed (moefast.precision) the products reading x (x W^T, x A_e) are wide
    # products: bf16 operands, fp32 accumulation and result. The rank-space ones stay fp32.
    z = wide_matmul(x, weight.T) + bias  # [N, out]
    if dropout_mask is not None:
        z = z * dropout_mask
    num_experts = lora_A.shape[0]
    if gate is not None:
        for e in range(num_experts):
            term = wide_matmul(x, lora_A[e]) @ lora_B[e] + lora_c[e]  # [N, out]
            z = z + gate[:, e : e + 1].to(x.dtype) * term
    elif domain is not None:
        for e in range(num_experts):
            rows = domain == e  # [N] bool: the rows this domain's adapter serves
            term = wide_matmul(x, lora_A[e]) @ lora_B[e] + lora_c[e]
            z = z + rows[:, None].to(x.dtype) * term
    elif expert is not None:
        z = z + wide_matmul(x, lora_A[expert]) @ lora_B[expert] + lora_c[expert]
    return _apply_activation(z, activation)


def adapter_linear_concat(
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
) -> torch.Tensor:
    """The same function as :func:`adapter_linear`, experts concatenated (the fast plain form).

    ``sum_e g_e (x A_e) B_e = ((x A_cat) * expand(g)) B_cat`` with ``A_cat [in, E r]`` and
    ``B_cat [E r, out]``; ``sum_e g_e c_e = g c``. Per-domain routing is the one-hot gate.
    Arguments and result as :func:`adapter_linear`.
    """
    check_adapter_inputs(x, weight, bias, lora_A, lora_B, lora_c, gate=gate, domain=domain,
                         expert=expert, dropout_mask=dropout_mask, activation=activation)
    z = torch.addmm(bias, x, weight.T)  # [N, out]
    if dropout_mask is not None:
        z = z * dropout_mask
    num_experts, d_in, rank = lora_A.shape
    if expert is not None:
        z = z + (x @ lora_A[expert]) @ lora_B[expert] + lora_c[expert]
    elif gate is not None or domain is not None:
        if gate is None:
            assert domain is not None
            g = torch.nn.functional.one_hot(domain, num_experts).to(x.dtype)  # [N, E]
        else:
            g = gate.to(x.dtype)
        a_cat = lora_A.permute(1, 0, 2).reshape(d_in, num_experts * rank)  # [in, E r]
        b_cat = lora_B.reshape(num_experts * rank, -1)  # [E r, out]
        h = (x @ a_cat) * g.repeat_interleave(rank, dim=1)  # [N, E r]
        z = z + h @ b_cat + g @ lora_c
    return _apply_activation(z, activation)
