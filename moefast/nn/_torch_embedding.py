"""Which ``torch.nn.Embedding`` / ``EmbeddingBag`` options moefast's embedding op reproduces.

The one check behind :meth:`moefast.nn.EmbeddingCollection.from_torch` and
:func:`moefast.convert`, so the two cannot drift: an option the op does not compute exactly is
refused with the module's name and the option, never dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from moefast.config import Pooling

__all__ = ["check_collection_padding", "check_padding_row", "check_torch_embedding"]

# Options whose every non-default value changes what the module computes, and why the op
# cannot (``include_last_offset`` exists on ``nn.EmbeddingBag`` only).
_UNSUPPORTED = (
    ("max_norm", "torch renormalises the looked-up rows of the weight in place"),
    ("scale_grad_by_freq", "torch divides each row's gradient by its count in the batch"),
    ("include_last_offset", "torch reads offsets as B + 1 bounds, not B bag starts"),
)


def check_torch_embedding(module: nn.Module, name: str, *, sparse: bool | None) -> Pooling:
    """The pooling moefast computes for ``module``, after refusing what it would compute differently.

    Args:
        module: an ``nn.Embedding`` or ``nn.EmbeddingBag`` (``TypeError`` otherwise).
        name: how errors name it (a feature name or a module path).
        sparse: the gradient layout of the moefast module that will replace it; the module's
            own ``sparse`` must match (``None``: no gradient at all, a fused optimizer).

    Raises:
        TypeError: not a torch embedding module, or a weight that is not float32.
        ValueError: ``max_norm``, ``scale_grad_by_freq``, ``include_last_offset``, bag mode
            ``max``, a ``sparse`` flag that differs, or a subclass with its own ``forward``.
            (``norm_type`` only acts with ``max_norm``; ``padding_idx`` is each caller's rule.)
    """
    if not isinstance(module, nn.Embedding | nn.EmbeddingBag):
        raise TypeError(f"{name}: expected nn.Embedding or nn.EmbeddingBag, got {type(module).__name__}")
    base = nn.EmbeddingBag if isinstance(module, nn.EmbeddingBag) else nn.Embedding
    kind = f"{name} (nn.{base.__name__})"
    if type(module).forward is not base.forward:
        raise ValueError(f"{kind}: {type(module).__name__} overrides forward, so moefast cannot know what it computes")
    for option, why in _UNSUPPORTED:
        value = getattr(module, option, None)
        if value is not None and value is not False:  # max_norm=0.0 renormalises too
            raise ValueError(f"{kind}: {option}={value!r} is not supported by moefast's embedding op ({why})")
    if sparse is not None and bool(module.sparse) != sparse:
        raise ValueError(f"{kind}: sparse={module.sparse!r}, but the moefast module that replaces it gives "
                         f"{'sparse' if sparse else 'dense'} gradients")
    if module.weight.dtype != torch.float32:
        raise TypeError(f"{kind}: moefast embeddings hold float32 tables, got {module.weight.dtype}")
    if base is nn.Embedding:
        return Pooling.NONE
    if module.mode not in ("sum", "mean"):
        raise ValueError(f"{kind}: mode {module.mode!r} is not supported by moefast's embedding op (sum, mean)")
    return Pooling.SUM if module.mode == "sum" else Pooling.MEAN


def check_padding_row(module: nn.Embedding, name: str) -> None:
    """``convert``'s rule for ``nn.Embedding``'s ``padding_idx``: the op returns zeros for the
    padding id where torch returns the stored row, so that row must be zero."""
    pad = module.padding_idx
    if pad is not None and bool(module.weight.detach()[pad].any()):
        raise ValueError(f"{name} (nn.Embedding): the padding row {pad} is not zero, so the lookups would differ")


def check_collection_padding(module: nn.Embedding | nn.EmbeddingBag, name: str) -> None:
    """:class:`~moefast.nn.EmbeddingCollection`'s rule: its input contract has no padding id for
    a single-valued field and id 0 for a bag (``[B, L]`` padded with 0, never pooled), so a
    module must have ``padding_idx`` ``None`` (``nn.Embedding``) or ``0`` (``nn.EmbeddingBag``)."""
    pad = module.padding_idx
    if isinstance(module, nn.EmbeddingBag):
        if pad != 0:
            raise ValueError(
                f"{name} (nn.EmbeddingBag): padding_idx={pad!r}, but EmbeddingCollection's bags skip id 0 "
                "(their [B, L] input is padded with 0) and pool every other id; build the module with "
                "padding_idx=0, or wrap it alone with moefast.nn.convert.EmbeddingBag.from_torch"
            )
    elif pad is not None:
        raise ValueError(
            f"{name} (nn.Embedding): padding_idx={pad!r}, but EmbeddingCollection's single-valued fields "
            "have no padding id (torch gives that row no gradient); wrap it with "
            "moefast.nn.convert.Embedding.from_torch, which keeps padding_idx"
        )
