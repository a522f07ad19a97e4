"""Feature-interaction layers of the CTR backbones, written once each (DESIGN.md section 2).

Every layer reads the per-field embeddings ``fields`` float32 ``[B, F, k]`` (``F`` fields sharing
one dim ``k``) except :class:`CrossNet`, which reads the flat ``[B, F k]`` concatenation.
Semantics follow the original papers and DeepCTR-Torch (which the seeds' code builds on); the
FM second-order term is :func:`moefast.models.deepfm.fm_interaction`, not repeated here.

- :func:`bi_interaction`: NFM's bi-interaction pooling (He & Chua, 2017).
- :func:`inner_products`: PNN's pairwise inner products (Qu et al., 2016).
- :class:`CrossNet`: DCN's cross network v1 (Wang et al., 2017).
- :class:`CIN`: xDeepFM's compressed interaction network (Lian et al., 2018).
- :class:`InteractingLayer`: AutoInt's multi-head self-attention with residual (Song et al., 2019).
- :class:`SENET` and :class:`BilinearInteraction`: FiBiNET's layers (Huang et al., 2019).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from moefast.precision import bf16_mixed, wide_linear, wide_matmul

__all__ = [
    "CIN",
    "SENET",
    "BilinearInteraction",
    "CrossNet",
    "InteractingLayer",
    "bi_interaction",
    "inner_products",
    "pair_indices",
]


def _pointwise_conv(conv: nn.Conv1d, z: torch.Tensor) -> torch.Tensor:
    """``conv(z)`` for a kernel-size-1 convolution; under bf16-mixed the same function as a wide
    product ``W[:, :, 0] @ z`` plus the float32 bias (:mod:`moefast.precision`)."""
    if not bf16_mixed():
        out: torch.Tensor = conv(z)
        return out
    y = wide_matmul(conv.weight[:, :, 0], z)  # [H_l, H F] @ [B, H F, k] -> [B, H_l, k]
    return y if conv.bias is None else y + conv.bias[:, None]


def _check_fields(fields: torch.Tensor, name: str) -> None:
    if fields.dim() != 3:
        raise ValueError(f"{name} needs fields [B, F, k], got shape {tuple(fields.shape)}")


def pair_indices(num_fields: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index vectors ``(i, j)`` of every pair ``i < j`` in ``itertools.combinations`` order."""
    pairs = list(itertools.combinations(range(num_fields), 2))
    rows = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device)
    cols = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)
    return rows, cols


def bi_interaction(fields: torch.Tensor) -> torch.Tensor:
    """NFM's pooling ``sum_{i<j} v_i * v_j`` (elementwise) of ``[B, F, k]`` -> ``[B, k]``.

    ``((sum_i v_i)^2 - sum_i v_i^2) / 2``: the FM term before its sum over ``k``.
    """
    _check_fields(fields, "bi_interaction")
    return 0.5 * (fields.sum(dim=1).pow(2) - fields.pow(2).sum(dim=1))


def inner_products(fields: torch.Tensor) -> torch.Tensor:
    """PNN's ``<v_i, v_j>`` for every pair ``i < j``: ``[B, F, k]`` -> ``[B, F (F - 1) / 2]``."""
    _check_fields(fields, "inner_products")
    rows, cols = pair_indices(fields.shape[1], fields.device)
    return (fields[:, rows] * fields[:, cols]).sum(dim=-1)


class CrossNet(nn.Module):
    """DCN's cross network v1: ``x_{l+1} = x_0 (x_l . w_l) + b_l + x_l``, ``num_layers`` times.

    The per-layer weight is a vector (the v1 parameterisation), Glorot-normal initialised as in
    DeepCTR-Torch; biases start at zero. Input and output ``[B, width]``.
    """

    def __init__(self, width: int, num_layers: int = 2) -> None:
        super().__init__()
        if width < 1 or num_layers < 1:
            raise ValueError(f"CrossNet needs width >= 1 and num_layers >= 1, got {width}, {num_layers}")
        self.kernels = nn.Parameter(torch.empty(num_layers, width))
        self.biases = nn.Parameter(torch.zeros(num_layers, width))
        for k in range(num_layers):
            # xavier_normal_ of a [width, 1] column, as DeepCTR-Torch initialises each kernel.
            nn.init.xavier_normal_(self.kernels.data[k].view(width, 1))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.kernels, self.biases, strict=True):
            x = x0 * wide_matmul(x, w).unsqueeze(1) + b + x  # (x @ w): [B], one scalar per sample
        return x


class CIN(nn.Module):
    """xDeepFM's compressed interaction network.

    Layer ``l``: ``Z[b, h, m, :] = X^{l-1}[b, h, :] * X^0[b, m, :]`` (``[B, H_{l-1} F, k]``),
    then a 1x1 convolution (with bias) to ``H_l`` feature maps and ReLU. With ``split_half``
    (DeepCTR-Torch's default) every layer but the last sends its first half of maps to the next
    layer and its second half to the output. The output sums each kept map over ``k``: ``[B, output_width]``.

    Args:
        num_fields: ``F``.
        layer_sizes: ``H_l`` per layer (even, except the last, when ``split_half``).
    """

    def __init__(self, num_fields: int, layer_sizes: Sequence[int] = (256, 128), *, split_half: bool = True) -> None:
        super().__init__()
        if not layer_sizes or any(s < 1 for s in layer_sizes):
            raise ValueError(f"CIN layer_sizes must be positive, got {tuple(layer_sizes)!r}")
        if split_half and any(s % 2 for s in layer_sizes[:-1]):
            raise ValueError(f"CIN with split_half needs even sizes but the last, got {tuple(layer_sizes)!r}")
        self.split_half = split_half
        self.convs = nn.ModuleList()
        previous = num_fields
        self.output_width = 0
        for index, size in enumerate(layer_sizes):
            self.convs.append(nn.Conv1d(previous * num_fields, size, kernel_size=1))
            last = index == len(layer_sizes) - 1
            keep = size // 2 if split_half and not last else size
            self.output_width += keep
            previous = size - keep if split_half and not last else size

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        _check_fields(fields, "CIN")
        batch, _, dim = fields.shape
        hidden = fields
        kept = []
        for index, conv in enumerate(self.convs):
            # Sizes spelled out (no -1): a 0-row batch has nothing to infer them from.
            z = torch.einsum("bhd,bmd->bhmd", hidden, fields).reshape(batch, hidden.shape[1] * fields.shape[1], dim)  # [B, H F, k]
            assert isinstance(conv, nn.Conv1d)
            x = torch.relu(_pointwise_conv(conv, z))  # [B, H_l, k]
            if self.split_half and index < len(self.convs) - 1:
                half = x.shape[1] // 2
                hidden, direct = x[:, :half], x[:, half:]  # DeepCTR-Torch's order
                kept.append(direct)
            else:
                kept.append(x)
                hidden = x
        return torch.cat(kept, dim=1).sum(dim=2)


class InteractingLayer(nn.Module):
    """AutoInt's multi-head self-attention over fields, with a residual connection.

    ``Q = V W_Q``, ``K = V W_K``, ``U = V W_V`` split into ``heads`` heads of ``k / heads``;
    per head ``softmax(Q K^T) U`` with the softmax over the keys, as in the paper (unscaled, as
    DeepCTR-Torch's default; some DeepCTR-Torch versions normalise over the batch axis instead,
    a known bug not reproduced here); heads concatenated, plus
    ``V W_R`` (the residual), then ReLU. ``[B, F, k]`` -> ``[B, F, k]``.
    """

    def __init__(self, dim: int, heads: int = 2, *, residual: bool = True, init_std: float = 0.05) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"InteractingLayer: embedding dim {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(dim, dim) * init_std)
        self.key = nn.Parameter(torch.randn(dim, dim) * init_std)
        self.value = nn.Parameter(torch.randn(dim, dim) * init_std)
        self.residual = nn.Parameter(torch.randn(dim, dim) * init_std) if residual else None

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        _check_fields(fields, "InteractingLayer")
        batch, num_fields, dim = fields.shape

        def split(x: torch.Tensor) -> torch.Tensor:  # [B, F, k] -> [B, heads, F, k / heads]
            return x.reshape(batch, num_fields, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = (split(wide_matmul(fields, w)) for w in (self.query, self.key, self.value))
        attention = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # [B, heads, F, F]
        out = (attention @ v).transpose(1, 2).reshape(batch, num_fields, dim)
        if self.residual is not None:
            out = out + wide_matmul(fields, self.residual)
        return torch.relu(out)


class SENET(nn.Module):
    """FiBiNET's squeeze-excitation over fields: ``z_f = mean_k v_f``,
    ``a = relu(W_2 relu(W_1 z))`` (no biases, ``F -> max(1, F // reduction) -> F``),
    output ``v_f * a_f``. ``[B, F, k]`` -> ``[B, F, k]``."""

    def __init__(self, num_fields: int, reduction: int = 3) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"SENET reduction must be >= 1, got {reduction}")
        hidden = max(1, num_fields // reduction)
        self.squeeze = nn.Linear(num_fields, hidden, bias=False)
        self.excite = nn.Linear(hidden, num_fields, bias=False)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        _check_fields(fields, "SENET")
        weights = torch.relu(wide_linear(torch.relu(wide_linear(fields.mean(dim=2), self.squeeze)), self.excite))  # [B, F]
        return fields * weights.unsqueeze(2)


class BilinearInteraction(nn.Module):
    """FiBiNET's bilinear interaction, "interaction" type: one ``W_ij [k, k]`` per pair,
    ``p_ij = (v_i W_ij) * v_j``. ``[B, F, k]`` -> ``[B, F (F - 1) / 2, k]``.

    ``weight[p]`` is the ``torch.nn.Linear`` layout (``out x in``), so ``v_i W_ij`` is
    ``v_i @ weight[p].T``, as in DeepCTR-Torch's ``nn.Linear(k, k, bias=False)`` per pair.
    """

    def __init__(self, num_fields: int, dim: int) -> None:
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"BilinearInteraction needs at least 2 fields, got {num_fields}")
        pairs = num_fields * (num_fields - 1) // 2
        self.weight = nn.Parameter(torch.empty(pairs, dim, dim))
        bound = 1.0 / dim**0.5  # nn.Linear's default uniform range
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        _check_fields(fields, "BilinearInteraction")
        rows, cols = pair_indices(fields.shape[1], fields.device)
        if bf16_mixed():  # the same products as P batched ones, each a wide product
            left = wide_matmul(fields[:, rows].transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)
        else:
            left = torch.einsum("bpk,pjk->bpj", fields[:, rows], self.weight)  # v_i @ W_p^T: [B, P, k]
        return left * fields[:, cols]
