"""``convert``: swap a model's layers for moefast's fast ones in place, keeping the weights.

What it does, module by module (``named_modules`` order):

- moefast layers (:class:`~moefast.nn.AdapterLinear`, :class:`~moefast.nn.EmbeddingCollection`):
  their ``backend`` is set; their parameters are untouched.
- ``torch.nn.Embedding`` -> :class:`Embedding`, ``torch.nn.EmbeddingBag`` (sum or mean) ->
  :class:`EmbeddingBag`: the same call signature and the same parameter (``weight``, the same
  tensor, so the ``state_dict`` keys and an optimizer already holding it are unchanged), looked
  up by the table-batched op :func:`moefast.ops.embedding_collection` (the C++ engine on CPU).
- ``torch.nn.Linear``: left as it is. A plain linear layer has no adapter, and the fused tower
  op's gain is the adapter expansion; the shared product is one ``addmm`` under every backend.

Options the engine does not implement (``max_norm``, ``scale_grad_by_freq``, ``sparse``, bag
mode ``max``, ``include_last_offset``, a subclass's own ``forward``) raise ``ValueError`` naming
the module, a weight that is not float32 ``TypeError``: a layer is never swapped for one that
computes something else. The check is :func:`moefast.nn._torch_embedding.check_torch_embedding`,
shared with :meth:`moefast.nn.EmbeddingCollection.from_torch`.
"""

from __future__ import annotations

import torch
from torch import nn

from moefast.config import Pooling
from moefast.nn._torch_embedding import check_padding_row, check_torch_embedding
from moefast.nn.adapter import AdapterLinear
from moefast.nn.embedding import EmbeddingCollection
from moefast.ops._backend import Backend, BackendLike, parse_backend
from moefast.ops.embedding import embedding_collection

__all__ = ["Embedding", "EmbeddingBag", "convert"]


def _check_float32(name: str, weight: torch.Tensor) -> None:
    if not isinstance(weight, nn.Parameter):
        raise TypeError(f"{name}: weight must be an nn.Parameter (it is shared, not copied)")
    if weight.dtype != torch.float32:
        raise TypeError(f"{name}: moefast embeddings hold float32 tables, got {weight.dtype}")


class Embedding(nn.Module):
    """Drop-in for ``torch.nn.Embedding``: ids int64/int32 of any shape ``S`` -> float32 ``[*S, D]``.

    ``weight`` is float32 ``[V, D]``. ``padding_idx`` (if set) looks up as a zero vector and
    gets no gradient, as in torch (where that row stays zero).
    """

    def __init__(self, weight: torch.Tensor, *, padding_idx: int | None = None, name: str = "embedding",
                 backend: BackendLike = None) -> None:
        super().__init__()
        _check_float32(name, weight)
        self.weight = weight
        self.padding_idx = padding_idx
        self.name = name
        self.backend = parse_backend(backend) if backend is not None else None

    @property
    def num_embeddings(self) -> int:
        return int(self.weight.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def from_torch(cls, module: nn.Embedding, *, name: str = "embedding",
                   backend: BackendLike = None) -> Embedding:
        """Wrap ``module``'s own ``weight`` (shared, not copied)."""
        if not isinstance(module, nn.Embedding) or isinstance(module, nn.EmbeddingBag):
            raise TypeError(f"{name}: expected nn.Embedding, got {type(module).__name__}")
        check_torch_embedding(module, name, sparse=False)
        check_padding_row(module, name)
        return cls(module.weight, padding_idx=module.padding_idx, name=name, backend=backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1)  # a single-valued field: one id per output row
        out = embedding_collection(
            [self.weight], [flat], [None], [Pooling.NONE], padding_idx=[self.padding_idx],
            names=[self.name], backend=self.backend,
        )  # [N, D]
        return out.view(*input.shape, self.embedding_dim)


class EmbeddingBag(nn.Module):
    """Drop-in for ``torch.nn.EmbeddingBag`` (mode ``sum`` or ``mean``): float32 ``[B, D]``.

    Input as torch: ids ``[B, L]`` (every row a bag of ``L``), or flat ids ``[N]`` with
    ``offsets [B]`` (bag starts). ``per_sample_weights`` float32 like ``input`` (``sum`` only).
    ``padding_idx`` ids are skipped: no contribution, no gradient, not counted by ``mean``.
    """

    def __init__(self, weight: torch.Tensor, *, mode: str = "mean", padding_idx: int | None = None,
                 name: str = "embedding_bag", backend: BackendLike = None) -> None:
        super().__init__()
        _check_float32(name, weight)
        if mode not in ("sum", "mean"):
            raise ValueError(f"{name}: EmbeddingBag mode {mode!r} is not supported (sum, mean)")
        self.weight = weight
        self.mode = mode
        self.padding_idx = padding_idx
        self.name = name
        self.backend = parse_backend(backend) if backend is not None else None

    @property
    def embedding_dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def from_torch(cls, module: nn.EmbeddingBag, *, name: str = "embedding_bag",
                   backend: BackendLike = None) -> EmbeddingBag:
        """Wrap ``module``'s own ``weight`` (shared, not copied)."""
        if not isinstance(module, nn.EmbeddingBag):
            raise TypeError(f"{name}: expected nn.EmbeddingBag, got {type(module).__name__}")
        check_torch_embedding(module, name, sparse=False)
        return cls(module.weight, mode=module.mode, padding_idx=module.padding_idx, name=name,
                   backend=backend)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError(f"{self.name}: offsets must be None for a 2-D input")
            rows, width = input.shape
            flat = input.reshape(-1)
            bounds = torch.arange(0, rows * width + 1, max(width, 1), dtype=input.dtype, device=input.device)
            if width == 0:
                bounds = torch.zeros(rows + 1, dtype=input.dtype, device=input.device)
            psw = per_sample_weights.reshape(-1) if per_sample_weights is not None else None
        elif input.dim() == 1:
            if offsets is None or offsets.dim() != 1:
                raise ValueError(f"{self.name}: a 1-D input needs 1-D offsets (bag starts)")
            flat = input
            if offsets.numel() == 0 and flat.numel() > 0:
                # torch returns [0, D] here, silently dropping every id.
                raise ValueError(f"{self.name}: offsets is empty (0 bags) but input holds {flat.numel()} ids")
            # torch gives bag starts [B]; the op takes bounds [B + 1] ending at N.
            bounds = torch.cat([offsets.to(input.dtype), flat.new_tensor([flat.numel()])])
            psw = per_sample_weights
        else:
            raise ValueError(f"{self.name}: input must be [B, L] or [N] with offsets, got {tuple(input.shape)}")
        pooling = Pooling.SUM if self.mode == "sum" else Pooling.MEAN
        return embedding_collection(
            [self.weight], [flat], [bounds], [pooling], None if psw is None else [psw],
            padding_idx=[self.padding_idx], names=[self.name], backend=self.backend,
        )


def convert(model: nn.Module, backend: Backend | str = "fast") -> nn.Module:
    """Point ``model``'s layers at ``backend``, swapping torch embedding layers in place.

    Args:
        model: any ``nn.Module``: a :func:`moefast.models.build` model, or a user's own model
            holding ``nn.Embedding`` / ``nn.EmbeddingBag`` layers (at any depth, also inside
            ``ModuleList`` / ``ModuleDict``).
        backend: ``"fast"`` (default), ``"reference"`` or ``"auto"``. An explicit ``fast`` that
            cannot serve a call (a CUDA table for the C++ engine) raises at that call, saying why.

    Returns:
        ``model`` itself (converted in place; every parameter is the same tensor as before, so
        the weights, the ``state_dict`` and an existing optimizer are kept).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Embedding | nn.EmbeddingBag):
        raise TypeError("convert swaps layers inside a model; wrap a bare embedding with "
                        "moefast.nn.convert.Embedding.from_torch / EmbeddingBag.from_torch")
    chosen = parse_backend(backend)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, AdapterLinear | EmbeddingCollection | Embedding | EmbeddingBag):
            module.backend = chosen
            continue
        for child_name, child in module.named_children():
            full = f"{path}.{child_name}" if path else child_name
            if isinstance(child, nn.EmbeddingBag):
                swaps.append((module, child_name, EmbeddingBag.from_torch(child, name=full, backend=chosen)))
            elif isinstance(child, nn.Embedding):
                swaps.append((module, child_name, Embedding.from_torch(child, name=full, backend=chosen)))
    for parent, child_name, replacement in swaps:
        setattr(parent, child_name, replacement)
    return model
