"""moefast.nn."""

from __future__ import annotations

from moefast.nn.adapter import Activation, AdapterLinear
from moefast.nn.convert import Embedding, EmbeddingBag
from moefast.nn.embedding import EmbeddingCollection

__all__ = ["Activation", "AdapterLinear", "Embedding", "EmbeddingBag", "EmbeddingCollection"]
