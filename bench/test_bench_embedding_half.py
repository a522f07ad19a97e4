"""Half-precision tables: the lookup and the fused update alone at fp32, fp16 and bf16, side by
side in one process, against FBGEMM's CPU TBE in the same precision where it has one (fp32 and
fp16 weights; it has no bf16 CPU weights).

Workload: ``test_bench_embedding.py``'s (26 fields, batch 4096, Zipf ids, 4 bagged fields),
``d16`` and ``d64``; ``MOEFAST_BENCH_MAX_ROWS`` caps the tables (a quick check of the code:
``MOEFAST_BENCH_MAX_ROWS=100000 pytest bench/test_bench_embedding_half.py --benchmark-disable``).
Each workload's tables are converted once per precision; the moefast update is lazy Adam and
row-wise Adagrad (FBGEMM: ``EXACT_ROWWISE_ADAGRAD`` with ``stochastic_rounding=True``).
Weights' bytes per precision go to ``extra_info`` (``table_bytes``), measured from the tensors.
Run: ``make bench BENCH_PATH=bench/test_bench_embedding_half.py BENCH_NAME=cpu-x86_64-embedding-half``;
ratios in docs/performance.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_bench_embedding import WORKLOADS, Workload, _cycle, _make_workload, _run

from moefast import _ext
from moefast.ops.embedding import LazyAdam, RowwiseAdagrad, embedding_collection

pytestmark = pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LR = 0.01


@pytest.fixture(scope="module", params=list(WORKLOADS))
def base_workload(request: pytest.FixtureRequest) -> Workload:
    dim, max_rows = WORKLOADS[request.param]
    cap = int(os.environ.get("MOEFAST_BENCH_MAX_ROWS", max_rows))
    return _make_workload(request.param, dim, min(max_rows, cap))


@pytest.fixture(params=list(PRECISIONS))
def precision(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _tables(workload: Workload, precision: str) -> list[torch.Tensor]:
    dtype = PRECISIONS[precision]
    return [w.detach().to(dtype).requires_grad_() for w in workload.weights]


def _info(benchmark: Any, workload: Workload, tables: list[torch.Tensor], provider: str, mode: str,
          precision: str) -> None:
    benchmark.group = f"embedding-half-{mode}-{workload.name}"
    rows = sum(int(i.shape[0]) * int(t.shape[1]) * t.element_size()
               for i, t in zip(workload.batches[0]["indices"], tables, strict=True))
    benchmark.extra_info.update(
        provider=provider, mode=mode, workload=workload.name, precision=precision,
        simd=_ext.native().simd_level(), threads=torch.get_num_threads(),
        table_bytes=sum(t.numel() * t.element_size() for t in tables),
        row_bytes_per_forward=rows,
        cpu=_cpu_name(),
    )


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def test_lookup_moefast(benchmark: Any, base_workload: Workload, precision: str) -> None:
    tables = _tables(base_workload, precision)
    _info(benchmark, base_workload, tables, "moefast", "forward", precision)
    next_batch = _cycle(base_workload)

    def step() -> torch.Tensor:
        b = next_batch()
        with torch.no_grad():
            return embedding_collection(tables, b["indices"], b["offsets"], b["poolings"], backend="fast")

    _run(benchmark, step)


def _fused_step(workload: Workload, tables: list[torch.Tensor], config: RowwiseAdagrad | LazyAdam) -> Callable[[], None]:
    states = [config.init_state(w) for w in tables]
    next_batch = _cycle(workload)

    def step() -> None:
        b = next_batch()
        out = embedding_collection(tables, b["indices"], b["offsets"], b["poolings"],
                                   optimizer=config, optimizer_states=states, backend="fast")
        out.backward(workload.grad_out)

    return step


@pytest.mark.parametrize("optimizer", ["lazy-adam", "rowwise-adagrad"])
def test_train_step_moefast(benchmark: Any, base_workload: Workload, precision: str, optimizer: str) -> None:
    tables = _tables(base_workload, precision)
    _info(benchmark, base_workload, tables, f"moefast-{optimizer}", "train_step", precision)
    config = LazyAdam(lr=LR) if optimizer == "lazy-adam" else RowwiseAdagrad(lr=LR)
    _run(benchmark, _fused_step(base_workload, tables, config))


def _fbgemm(workload: Workload, precision: str, optimizer: str | None) -> Any:
    if precision == "bf16":
        pytest.skip("FBGEMM's CPU TBE has no bf16 weights")
    fbgemm = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_training")
    common = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_common")
    configs = pytest.importorskip("fbgemm_gpu.split_embedding_configs")
    specs = [(int(w.shape[0]), int(w.shape[1]), common.EmbeddingLocation.HOST, fbgemm.ComputeDevice.CPU)
             for w in workload.weights]
    kwargs: dict[str, Any] = {"weights_precision": configs.SparseType.FP16 if precision == "fp16"
                              else configs.SparseType.FP32}
    if optimizer is not None:
        kwargs |= {"optimizer": configs.EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": LR, "eps": 1e-8,
                   "stochastic_rounding": True}
    tbe = fbgemm.SplitTableBatchedEmbeddingBagsCodegen(
        specs, pooling_mode=common.PoolingMode.SUM, device=torch.device("cpu"), **kwargs)
    with torch.no_grad():
        for dst, src in zip(tbe.split_embedding_weights(), workload.weights, strict=True):
            dst.copy_(src)
    return tbe


def test_lookup_fbgemm(benchmark: Any, base_workload: Workload, precision: str) -> None:
    tbe = _fbgemm(base_workload, precision, None)
    _info(benchmark, base_workload, list(tbe.split_embedding_weights()), "fbgemm", "forward", precision)
    next_batch = _cycle(base_workload)

    def step() -> torch.Tensor:
        b = next_batch()
        with torch.no_grad():
            out: torch.Tensor = tbe(b["tbe_indices"], b["tbe_offsets"])
            return out

    _run(benchmark, step)


def test_train_step_fbgemm_rowwise_adagrad(benchmark: Any, base_workload: Workload, precision: str) -> None:
    tbe = _fbgemm(base_workload, precision, "rowwise_adagrad")
    _info(benchmark, base_workload, list(tbe.split_embedding_weights()), "fbgemm-rowwise-adagrad",
          "train_step", precision)
    next_batch = _cycle(base_workload)

    def step() -> None:
        b = next_batch()
        tbe(b["tbe_indices"], b["tbe_offsets"]).backward(base_workload.grad_out)

    _run(benchmark, step)
