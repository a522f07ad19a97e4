"""moefast.nn."""

from __future__ import annotations

from moefast.nn.adapter import Activation, AdapterLinear

__all__ = ["Activation", "AdapterLinear"]
