"""moefast.ops: autograd Functions and functional entry points, one backend argument each.

Owns: backend resolution (:mod:`moefast.ops._backend`) and the launchers of the fast paths (the
C++ engine, the CPU tower nodes, the Triton kernels, imported lazily). Never imports: the
modules (:mod:`moefast.nn`), the models, the data, training, run directories, experiments,
export or the command line.
"""

from __future__ import annotations

from moefast.ops.adapter import adapter_linear
from moefast.ops.dropout import dropout_mask
from moefast.ops.embedding import embedding_collection

__all__ = ["adapter_linear", "dropout_mask", "embedding_collection"]
