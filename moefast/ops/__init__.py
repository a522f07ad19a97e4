"""moefast.ops."""

from __future__ import annotations

from moefast.ops.adapter import adapter_linear

__all__ = ["adapter_linear"]
