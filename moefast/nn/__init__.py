"""moefast.nn: the modules (parameters only; they call :mod:`moefast.ops`), ``moefast.convert``.

Owns: the adapter layer, the embedding collection and the drop-in embeddings. Never imports:
the models, the data, training, run directories, experiments, export or the command line.
"""

from __future__ import annotations

from moefast.nn.adapter import Activation, AdapterLinear
from moefast.nn.convert import Embedding, EmbeddingBag
from moefast.nn.embedding import EmbeddingCollection

__all__ = ["Activation", "AdapterLinear", "Embedding", "EmbeddingBag", "EmbeddingCollection"]
