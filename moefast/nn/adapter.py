"""``AdapterLinear``: one tower layer with MLoRA / MoE-MLoRA adapters (DESIGN.md section 2).

The module holds parameters only and calls :func:`moefast.ops.adapter_linear`; the parameters are
the same under every backend, so a checkpoint moves between a CPU reference run and a GPU fast
run unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch

from moefast.ops._backend import Backend, BackendLike, parse_backend
from moefast.ops.adapter import adapter_linear
from moefast.ops.dropout import dropout_mask
from moefast.reference.adapter import Activation

__all__ = ["Activation", "AdapterLinear", "global_batch_rows"]

# (global rows, start, stop) while a data-parallel rank runs its slice of a global batch.
_BATCH_SLICE: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar(
    "moefast_batch_slice", default=None
)


@contextlib.contextmanager
def global_batch_rows(total: int, start: int, stop: int) -> Iterator[None]:
    """Inside this block, a layer called on rows ``[start, stop)`` of a global batch of
    ``total`` rows draws the dropout mask of the whole global batch and keeps its own rows, so
    that N data-parallel ranks draw exactly the masks one process draws
    (:mod:`moefast.train.parallel.data_parallel`). Every rank's generator advances by the same amount."""
    if not 0 <= start <= stop <= total:
        raise ValueError(f"a batch slice needs 0 <= start <= stop <= total, got {start}, {stop}, {total}")
    token = _BATCH_SLICE.set((total, start, stop))
    try:
        yield
    finally:
        _BATCH_SLICE.reset(token)


class AdapterLinear(torch.nn.Module):
    """``y = act(dropout(x W^T + b) + adapter_term)`` with E low-rank experts.

    Args:
        in_features, out_features: the layer's widths.
        num_experts: E, the number of adapters (MLoRA: one per domain; MoE-MLoRA: all experts).
        rank: r, the adapters' rank (``max(units // alpha, 1)`` in the seeds).
        activation: ``Activation.RELU`` (hidden tower layers) or ``Activation.NONE``.
        dropout: probability p of zeroing an element of the shared path (training mode only).
        backend: ``"reference"``, ``"fast"``, ``"auto"`` or None (then ``MOEFAST_BACKEND``,
            then auto); may be changed later through the ``backend`` attribute.

    Parameters (identical under every backend):
        weight ``[out, in]`` (``torch.nn.Linear`` layout, so a Linear's weights load), bias
        ``[out]``, lora_A ``[E, in, r]``, lora_B ``[E, r, out]``, lora_c ``[E, out]``.

    Forward: ``layer(x, gate=None, domain=None, expert=None)`` with x ``[N, in]``; gate ``[N, E]``
    float (MoE-MLoRA), domain ``[N]`` int64 (MLoRA) or expert int (the expert stage); at most
    one; none means the base layer only. Returns ``[N, out]`` in x's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        rank: int,
        *,
        activation: Activation = Activation.RELU,
        dropout: float = 0.0,
        backend: BackendLike = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_experts", num_experts), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(activation, Activation):
            raise TypeError(f"activation must be an Activation, got {activation!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must lie in [0, 1], got {dropout!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.rank = rank
        self.activation = activation
        self.dropout = float(dropout)
        # False: no mask is drawn even in training mode (a stage whose shared path is frozen,
        # under TrainConfig.frozen_path_dropout off). Not a parameter: set per stage.
        self.dropout_active = True
        self.backend: Backend | None = None if backend is None else parse_backend(backend)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.empty(out_features))
        self.lora_A = torch.nn.Parameter(torch.empty(num_experts, in_features, rank))
        self.lora_B = torch.nn.Parameter(torch.empty(num_experts, rank, out_features))
        self.lora_c = torch.nn.Parameter(torch.empty(num_experts, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The seeds' init: W and every A_e Glorot uniform, b, B and c zeros (a no-op adapter)."""
        torch.nn.init.xavier_uniform_(self.weight)
        torch.nn.init.zeros_(self.bias)
        # Glorot per expert with fan_in = in, fan_out = r, as a Keras Dense(in -> r) would be.
        bound = math.sqrt(6.0 / (self.in_features + self.rank))
        torch.nn.init.uniform_(self.lora_A, -bound, bound)
        torch.nn.init.zeros_(self.lora_B)
        torch.nn.init.zeros_(self.lora_c)

    def forward(
        self,
        x: torch.Tensor,
        gate: torch.Tensor | None = None,
        domain: torch.Tensor | None = None,
        expert: int | None = None,
    ) -> torch.Tensor:
        mask = self.dropout_mask_for(x) if x.dim() == 2 else None
        return adapter_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_c,
            gate=gate, domain=domain, expert=expert, dropout_mask=mask,
            activation=self.activation, backend=self.backend,
        )

    def dropout_mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The dropout factor for input ``x [N, in]`` (None outside training, without dropout,
        or while ``dropout_active`` is off).

        Drawn as ``torch.rand < keep`` (see :mod:`moefast.reference.dropout`); the fast backend
        draws the same bits natively on CPU, so both backends see the same masks.
        """
        if not self.training or self.dropout == 0.0 or not self.dropout_active:
            return None
        part = _BATCH_SLICE.get()
        if part is None:
            return dropout_mask((x.shape[0], self.out_features), self.dropout, dtype=x.dtype,
                                device=x.device, backend=self.backend)
        total, start, stop = part
        if x.shape[0] != stop - start:
            raise ValueError(f"input of {x.shape[0]} rows inside global_batch_rows({total}, {start}, {stop})")
        full = dropout_mask((total, self.out_features), self.dropout, dtype=x.dtype,
                            device=x.device, backend=self.backend)
        return full[start:stop]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, rank={self.rank}, "
                f"activation={self.activation.name}, dropout={self.dropout}")
