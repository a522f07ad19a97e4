"""Sparse embedding engine vs torch and FBGEMM, side by side in one process (CPU).

Workload (the production-like CTR input of DESIGN.md section 7): 26 fields, batch 4096, tables
of 10^4 to 10^7 rows (log-spaced) with Zipf-distributed ids, 4 of the fields multi-valued
(sum-pooled bags of 0 to 20 ids). Two widths: ``d16`` (every table dim 16, up to 10^7 rows)
and ``d64`` (dim 64; tables capped at 10^6 rows to keep memory under a few GiB).

Providers, by mode:

- ``forward``: moefast (one engine call), torch (``F.embedding_bag`` per field + ``torch.cat``,
  FBGEMM's JIT kernel inside), fbgemm (``SplitTableBatchedEmbeddingBagsCodegen`` on CPU).
- ``train_step`` = forward + backward + optimizer step: moefast fused row-wise Adagrad vs
  fbgemm fused ``EXACT_ROWWISE_ADAGRAD`` (the same algorithm); moefast fused lazy Adam vs
  torch sparse gradient + ``torch.optim.SparseAdam``; torch dense gradient + ``torch.optim.Adam``
  (``d64`` only: on ``d16`` its 10^7-row tables take seconds per step and > 10 GiB of state).

fbgemm-gpu-cpu is optional (``pip install --no-deps fbgemm-gpu-cpu==1.8.0``): its providers are
skipped when it is not installed. Run: ``make bench ARGS="-k embedding"``; ratios in docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moefast import _ext
from moefast.config import Pooling
from moefast.ops.embedding import LazyAdam, RowwiseAdagrad, embedding_collection

pytestmark = pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")

BATCH = 4096
NUM_FIELDS = 26
MULTI_VALUED = (3, 9, 15, 21)  # field positions with bags (spread over small and large tables)
MAX_BAG = 20
ZIPF_SEED = 0
NUM_BATCHES = 4  # distinct batches cycled through, so no round replays the previous one's cache
ROUNDS = 20
LR = 0.01


@dataclass
class Workload:
    name: str
    weights: list[torch.Tensor]  # float32 [V_t, D_t], shared by moefast and torch
    batches: list[dict[str, Any]]
    grad_out: torch.Tensor  # [B, sum D]

    @property
    def dims(self) -> list[int]:
        return [int(w.shape[1]) for w in self.weights]


def _zipf_ids(vocab: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Ids with P(rank k) ~ 1/(k + 1) (log-uniform ranks), hot ids spread over the table by a
    multiplicative hash as real hashed ids are."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    ranks = (torch.pow(float(vocab + 1), u) - 1).long().clamp_(0, vocab - 1)
    return (ranks * 2_654_435_761) % vocab


def _make_workload(name: str, dim: int, max_rows: int) -> Workload:
    g = torch.Generator().manual_seed(ZIPF_SEED)
    vocabs = [round(10 ** (4 + (math.log10(max_rows) - 4) * t / (NUM_FIELDS - 1))) for t in range(NUM_FIELDS)]
    # Leaf tensors that require grad, shared by every provider (a private copy per provider
    # would take the d16 workload past 10 GiB); train steps update them in place.
    weights = [(torch.randn(v, dim, generator=g) * 0.01).requires_grad_() for v in vocabs]
    batches = []
    for _ in range(NUM_BATCHES):
        indices, offsets = [], []
        for t, vocab in enumerate(vocabs):
            if t in MULTI_VALUED:
                lengths = torch.randint(0, MAX_BAG + 1, (BATCH,), generator=g)
                off = torch.zeros(BATCH + 1, dtype=torch.int64)
                off[1:] = lengths.cumsum(0)
            else:
                off = torch.arange(BATCH + 1, dtype=torch.int64)
            indices.append(_zipf_ids(vocab, int(off[-1]), g))
            offsets.append(off)
        batch: dict[str, Any] = {
            "indices": indices,
            "offsets": [off if t in MULTI_VALUED else None for t, off in enumerate(offsets)],
            "bag_offsets": offsets,  # torch's embedding_bag wants offsets for every field
            # fbgemm's table-batched layout: all ids concatenated, offsets [T * B + 1].
            "tbe_indices": torch.cat(indices),
            "tbe_offsets": torch.cat(
                [torch.zeros(1, dtype=torch.int64)]
                + [off[1:] + sum(int(i.shape[0]) for i in indices[:t]) for t, off in enumerate(offsets)]
            ),
        }
        batches.append(batch)
    poolings = [Pooling.SUM if t in MULTI_VALUED else Pooling.NONE for t in range(NUM_FIELDS)]
    for batch in batches:
        batch["poolings"] = poolings
    grad_out = torch.randn(BATCH, dim * NUM_FIELDS, generator=g)
    return Workload(name, weights, batches, grad_out)


WORKLOADS = {"d16": (16, 10**7), "d64": (64, 10**6)}


@pytest.fixture(scope="module", params=list(WORKLOADS))
def workload(request: pytest.FixtureRequest) -> Workload:
    dim, max_rows = WORKLOADS[request.param]
    return _make_workload(request.param, dim, max_rows)


def _cycle(workload: Workload) -> Callable[[], dict[str, Any]]:
    state = {"i": 0}

    def next_batch() -> dict[str, Any]:
        state["i"] = (state["i"] + 1) % len(workload.batches)
        return workload.batches[state["i"]]

    return next_batch


def _fbgemm_tbe(workload: Workload, optimizer: str | None) -> Any:
    fbgemm = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_training")
    common = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_common")
    configs = pytest.importorskip("fbgemm_gpu.split_embedding_configs")
    specs = [
        (int(w.shape[0]), int(w.shape[1]), common.EmbeddingLocation.HOST, fbgemm.ComputeDevice.CPU)
        for w in workload.weights
    ]
    kwargs: dict[str, Any] = {}
    if optimizer == "rowwise_adagrad":
        kwargs = {"optimizer": configs.EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": LR, "eps": 1e-8}
    tbe = fbgemm.SplitTableBatchedEmbeddingBagsCodegen(
        specs, pooling_mode=common.PoolingMode.SUM, device=torch.device("cpu"), **kwargs
    )
    with torch.no_grad():
        for dst, src in zip(tbe.split_embedding_weights(), workload.weights, strict=True):
            dst.copy_(src)
    return tbe


def _info(benchmark: Any, workload: Workload, provider: str, mode: str) -> None:
    rows_read = sum(int(i.shape[0]) for i in workload.batches[0]["indices"])
    benchmark.group = f"embedding-{mode}-{workload.name}"
    benchmark.extra_info.update(
        provider=provider,
        mode=mode,
        workload=workload.name,
        batch=BATCH,
        fields=NUM_FIELDS,
        dims=sorted(set(workload.dims)),
        max_rows=max(int(w.shape[0]) for w in workload.weights),
        ids_per_batch=rows_read,
        dtype="float32",
        threads=torch.get_num_threads(),
        # Bytes of table rows read per forward: the memory traffic floor of the lookup.
        row_bytes_per_forward=sum(
            int(i.shape[0]) * d * 4 for i, d in zip(workload.batches[0]["indices"], workload.dims, strict=True)
        ),
    )


def _run(benchmark: Any, fn: Callable[[], object]) -> None:
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)


# ---------------------------------------------------------------------------------------------
# Forward


def test_forward_moefast(benchmark: Any, workload: Workload) -> None:
    _info(benchmark, workload, "moefast", "forward")
    next_batch = _cycle(workload)

    def step() -> torch.Tensor:
        b = next_batch()
        with torch.no_grad():
            return embedding_collection(workload.weights, b["indices"], b["offsets"], b["poolings"], backend="fast")

    _run(benchmark, step)


def test_forward_torch(benchmark: Any, workload: Workload) -> None:
    _info(benchmark, workload, "torch", "forward")
    next_batch = _cycle(workload)

    def step() -> torch.Tensor:
        b = next_batch()
        with torch.no_grad():
            return torch.cat(
                [
                    F.embedding_bag(i, w, o, mode="sum", include_last_offset=True)
                    for i, w, o in zip(b["indices"], workload.weights, b["bag_offsets"], strict=True)
                ],
                dim=1,
            )

    _run(benchmark, step)


def test_forward_fbgemm(benchmark: Any, workload: Workload) -> None:
    tbe = _fbgemm_tbe(workload, None)
    _info(benchmark, workload, "fbgemm", "forward")
    next_batch = _cycle(workload)

    def step() -> torch.Tensor:
        b = next_batch()
        with torch.no_grad():
            out: torch.Tensor = tbe(b["tbe_indices"], b["tbe_offsets"])
            return out

    _run(benchmark, step)


# ---------------------------------------------------------------------------------------------
# Forward + backward + optimizer step


def _moefast_fused_step(workload: Workload, config: RowwiseAdagrad | LazyAdam) -> Callable[[], None]:
    weights = workload.weights
    states = [config.init_state(w) for w in weights]
    next_batch = _cycle(workload)

    def step() -> None:
        b = next_batch()
        out = embedding_collection(
            weights, b["indices"], b["offsets"], b["poolings"],
            optimizer=config, optimizer_states=states, backend="fast",
        )
        out.backward(workload.grad_out)

    return step


def test_train_step_moefast_rowwise_adagrad(benchmark: Any, workload: Workload) -> None:
    _info(benchmark, workload, "moefast-rowwise-adagrad", "train_step")
    _run(benchmark, _moefast_fused_step(workload, RowwiseAdagrad(lr=LR)))


def test_train_step_moefast_lazy_adam(benchmark: Any, workload: Workload) -> None:
    _info(benchmark, workload, "moefast-lazy-adam", "train_step")
    _run(benchmark, _moefast_fused_step(workload, LazyAdam(lr=LR)))


def test_train_step_fbgemm_rowwise_adagrad(benchmark: Any, workload: Workload) -> None:
    tbe = _fbgemm_tbe(workload, "rowwise_adagrad")
    _info(benchmark, workload, "fbgemm-rowwise-adagrad", "train_step")
    next_batch = _cycle(workload)

    def step() -> None:
        b = next_batch()
        tbe(b["tbe_indices"], b["tbe_offsets"]).backward(workload.grad_out)

    _run(benchmark, step)


def _torch_step(workload: Workload, sparse: bool) -> Callable[[], None]:
    weights = workload.weights
    opt: torch.optim.Optimizer = (
        torch.optim.SparseAdam(weights, lr=LR) if sparse else torch.optim.Adam(weights, lr=LR)
    )
    next_batch = _cycle(workload)

    def step() -> None:
        b = next_batch()
        out = torch.cat(
            [
                F.embedding_bag(i, w, o, mode="sum", include_last_offset=True, sparse=sparse)
                for i, w, o in zip(b["indices"], weights, b["bag_offsets"], strict=True)
            ],
            dim=1,
        )
        out.backward(workload.grad_out)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def test_train_step_torch_sparse_adam(benchmark: Any, workload: Workload) -> None:
    _info(benchmark, workload, "torch-sparse-SparseAdam", "train_step")
    _run(benchmark, _torch_step(workload, sparse=True))


def test_train_step_torch_dense_adam(benchmark: Any, workload: Workload) -> None:
    if workload.name == "d16":
        pytest.skip("dense Adam over 10^7-row tables: seconds per step and > 10 GiB of state")
    _info(benchmark, workload, "torch-dense-Adam", "train_step")
    step = _torch_step(workload, sparse=False)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
