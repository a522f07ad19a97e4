"""Triton kernels and their host launchers, installed as ``moefast.kernels``.

Importing this package imports triton; ``moefast`` itself never does (ops import kernels lazily,
inside the CUDA / interpreter branch).
"""

from __future__ import annotations

if __name__ != "moefast.kernels":
    # An editable install puts the source root on sys.path (scikit-build-core's redirect mode
    # does that for every mapped package), which would expose this folder as a top-level
    # `kernels`. Refuse it, so there is exactly one name for these kernels.
    raise ImportError(f"moefast's Triton kernels are imported as moefast.kernels, not as {__name__!r}")

__all__: list[str] = []
