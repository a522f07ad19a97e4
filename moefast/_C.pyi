"""moefast native CPU kernels (sparse embedding engine, dropout masks)."""

from collections.abc import Sequence
from typing import Annotated

import numpy
from numpy.typing import NDArray


def core_build_info() -> str:
    """
    How the hot static library was compiled, e.g. 'opt=-O3;optimize=speed;...'.
    """

def embedding_forward(pointers: Sequence[int], meta: Sequence[int], names: Sequence[str], batch: int, out: Annotated[NDArray[numpy.float32], dict(shape=(None, None), order='C', device='cpu')], num_threads: int) -> None:
    """
    Table-batched lookup into out [batch, >= sum of dims] (float32). Spec: moefast.reference.embedding.embedding_collection. Per field, pointers = (weight, indices, offsets or 0, per_sample_weights or 0) and meta = (rows, dim, num_indices, index_is_64, pooling 0 none / 1 sum / 2 mean, padding_idx or -1, table type 0 float32 / 1 float16 / 2 bfloat16, table key). Half tables are pooled in float32. ValueError names the field for an id out of range or inconsistent offsets.
    """

def embedding_backward_rows(pointers: Sequence[int], meta: Sequence[int], names: Sequence[str], batch: int, grad_out: Annotated[NDArray[numpy.float32], dict(shape=(None, None), order='C', device='cpu')], need: Sequence[bool], rows_out: Annotated[NDArray[numpy.int64], dict(shape=(None,), order='C', device='cpu')], grads_out: Annotated[NDArray[numpy.float32], dict(shape=(None,), order='C', device='cpu')], num_threads: int) -> list[int]:
    """
    Backward as unique rows: field t's sorted unique ids go to rows_out[sum of previous N:] and their summed gradients to grads_out[sum of previous N * dim:]; returns the count per field. Spec: moefast.reference.embedding.embedding_collection_row_grads.
    """

def embedding_backward_update(pointers: Sequence[int], meta: Sequence[int], names: Sequence[str], batch: int, grad_out: Annotated[NDArray[numpy.float32], dict(shape=(None, None), order='C', device='cpu')], need: Sequence[bool], kind: int, lr: float, eps: float, beta1: float, beta2: float, seed: int, state_pointers: Sequence[int], num_threads: int) -> None:
    """
    Backward fused with a sparse optimizer (kind 0: row-wise Adagrad with state_pointers (sum, 0, 0, 0) per field; 1: lazy Adam with (0, exp_avg, exp_avg_sq, step)) that updates the rows seen in place; half tables are rounded back stochastically with bits drawn from seed. Spec: moefast.reference.embedding_optim.
    """

def simd_level() -> str:
    """
    The clone of the engine's kernels this process runs: 'avx512', 'avx2' or 'baseline' (chosen once from the CPU and MOEFAST_DISABLE_AVX512 / MOEFAST_DISABLE_AVX2).
    """

def dropout_mask(state: Annotated[NDArray[numpy.uint8], dict(shape=(None,), order='C', device='cpu')], out: Annotated[NDArray[numpy.float32], dict(shape=(None,), order='C', device='cpu')], keep_below: int, scale: float) -> None:
    """
    Fills out (float32) with the dropout factors torch.rand(out.numel()) < keep would draw from the CPU generator whose get_state() bytes are state (uint8 [5056]), advancing those bytes as torch would: out[i] = scale where draw i's 24 bits are below keep_below, else 0. Spec: moefast.ops.dropout.
    """
