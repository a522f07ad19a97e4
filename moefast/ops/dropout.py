"""``dropout_mask``: dropout factors with backend resolution.

Same signature and bits as :func:`moefast.reference.dropout.dropout_mask`, plus ``backend``.
``fast`` draws float32 masks on CPU natively: ``moefast._C.dropout_mask`` runs torch's own
mt19937 stream with SIMD (csrc/dropout.cpp) on a copy of the generator's state, then hands the
advanced state back to the generator. The mask and the generator afterwards are exactly what the
reference gives (tested bit for bit), about 8x faster for a ``[1024, 256]`` mask.

Everywhere else (CUDA, where ``torch.rand`` is already a vectorised Philox kernel; other dtypes;
no compiled extension) ``fast`` draws with ``torch.rand`` like the reference. Both give the same
bits, so no request is refused: the choice changes the speed only.

Like any use of a shared generator, drawing from one generator in two threads at once gives
an order-dependent result; here the two draws could also repeat each other's numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from moefast import _ext
from moefast.ops._backend import Backend, BackendLike, requested_backend
from moefast.reference import dropout as _reference

__all__ = ["dropout_mask", "why_not_fast"]


def why_not_fast(dtype: torch.dtype, device: torch.device | str) -> str | None:
    """None when the native generator can draw a mask of ``dtype`` on ``device``, else why not
    (then every backend draws with ``torch.rand``)."""
    if torch.device(device).type != "cpu":
        return f"device {device} (the native mask generator is CPU-only)"
    if dtype != torch.float32:
        return f"dtype {dtype} (the native mask generator draws float32's 24-bit uniforms)"
    if not _ext.available():
        return "the C++ extension moefast._C is not built"
    return None


@functools.lru_cache(maxsize=64)
def _draw_constants(keep: float) -> tuple[int, float]:
    """``(keep_below, scale)`` for ``keep``: how many 24-bit draws ``u`` have
    ``u * 2^-24 < keep`` once ``keep`` is cast to float32, as ``torch.rand(...).lt_(keep)``
    compares; and the float32 bits ``div_(keep)`` writes for a kept element."""
    keep32 = torch.tensor(keep, dtype=torch.float32).item()
    keep_below = math.ceil(keep32 * (1 << 24))  # exact: keep32 has 24 significant bits
    return keep_below, torch.ones(1, dtype=torch.float32).div_(keep).item()


def dropout_mask(
    shape: Sequence[int],
    p: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    backend: BackendLike = None,
) -> torch.Tensor:
    """``[*shape]``: 0 with probability ``p``, else ``1 / (1 - p)`` (see the module docstring)."""
    sizes = _reference.check_dropout_args(shape, p)
    keep = 1.0 - float(p)
    # "fast" where the native draw does not apply is served by torch.rand: the same bits (see
    # the module docstring), so no request is refused.
    wanted = requested_backend(backend)
    if wanted is Backend.REFERENCE or keep == 0.0 or why_not_fast(dtype, device) is not None:
        return _reference.dropout_mask(sizes, p, dtype=dtype, device=device, generator=generator)
    gen = generator if generator is not None else torch.default_generator
    if gen.device.type != "cpu":
        raise ValueError(f"a CPU mask needs a CPU generator, got one on {gen.device}")
    out = torch.empty(sizes, dtype=torch.float32)
    keep_below, scale = _draw_constants(keep)
    state = gen.get_state()
    _ext.native().dropout_mask(state, out.view(-1), keep_below, scale)
    gen.set_state(state)
    return out
