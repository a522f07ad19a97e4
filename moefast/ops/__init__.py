"""moefast.ops."""

from __future__ import annotations

from moefast.ops.adapter import adapter_linear
from moefast.ops.dropout import dropout_mask
from moefast.ops.embedding import embedding_collection

__all__ = ["adapter_linear", "dropout_mask", "embedding_collection"]
