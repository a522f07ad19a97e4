"""End-to-end training and evaluation throughput: reference vs fast, with DeepCTR-Torch as peer.

Workload: DeepFM with a MoE-MLoRA tower (256, 128, 64), batch 1024, on the synthetic ``paper``
(3 fields of dim 8, 10 domains) and ``wide`` (26 fields of dim 16, 3 of them bags, tables up to
2e6 rows) presets. One benchmark round is **staged training** as ``fit`` runs it, shortened:
``STEPS`` single-domain steps of every stage (backbone on all domains, each expert on its own
domain, the gate on all domains), each stage with its own freezing and a fresh Adam, no
evaluation. The ``fit-rows`` variant (groups ``train-<preset>-fit-rows``) spreads the rows as
``fit`` does in an epoch instead: ``STEPS`` steps per expert stage, ``STEPS * D`` for the
backbone and the gate stages. ``evaluate`` is the test-time forward over ``EVAL_ROWS`` rows, batch 32768.

The stages' dense Adam is ``moefast.train.loop.stage_optimizer``'s, as ``fit`` builds it: torch's
fused Adam under the fast backend, its for-loop Adam under the reference (the same update).
Embedding optimizer, like with like: ``paper`` uses the method's dense Adam on both backends;
``wide`` uses lazy Adam on both (the reference's plain-PyTorch lazy Adam vs the update fused in
the C++ backward), since dense Adam on 5e6-row tables measures torch's Adam, not moefast.

Peer: DeepCTR-Torch 0.3.0's plain DeepFM (same fields, dims, tower, dropout, L2) trained with
its forward, its regularisation loss and ``torch.optim.Adam``, stepped by hand (no ``fit`` loop
overhead, so the strongest form of the peer), and, in ``train-paper``, trained by its own
``compile``/``fit`` as its users run it. Skipped when ``deepctr_torch`` is absent
(``.venv/bin/pip install deepctr-torch==0.3.0 requests``).

``scaling``: the fast backend's full-mixture training step (gate stage with the backbone
trainable: every parameter and every expert in play) as batch size, domains, experts per domain
and table size grow. Results: ``make bench BENCH_PATH=bench/test_bench_train.py BENCH_NAME=cpu-x86_64-train``;
``bench/report_train.py`` turns the JSON into docs/performance.md's tables.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from moefast import _ext, data, models
from moefast.config import MLoRAMode, Precision, TablePrecision, TowerKind, TrainConfig
from moefast.data.dataset import Batch, MultiDomainDataset
from moefast.models.base import CTRModel
from moefast.nn.tower import Tower
from moefast.precision import cpu_flags
from moefast.reference.embedding_optim import LazyAdam
from moefast.train.loop import (
    _set_backend,
    _table_ids,
    embedding_collections,
    l2_parameters,
    predict,
    set_embedding_optimizer,
    stage_optimizer,
    train_step,
)
from moefast.train.stages import StageStep, plan_stages, set_stage

BATCH = 1024
STEPS = 3  # per stage per round: 12 stages x 3 steps = 36 steps of 1024 rows
EVAL_ROWS = 65536
ROUNDS = 5
ROWS = 100_000
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def _dataset(preset: str, **knobs: Any) -> MultiDomainDataset:
    return data.load("synthetic", preset=preset, seed=123, rows=ROWS, **knobs)


def _domain_rows(ds: MultiDomainDataset, steps: int, batch: int) -> list[list[torch.Tensor]]:
    """Per domain, ``steps`` chunks of ``batch`` train-row indices (reused cyclically if few)."""
    out = []
    for d in range(ds.num_domains):
        rows = torch.nonzero(ds.train.domain == d).squeeze(1)
        out.append(list(rows[torch.arange(steps * batch) % len(rows)].split(batch)))
    return out


def _domain_batches(ds: MultiDomainDataset, steps: int, batch: int) -> list[list[Batch]]:
    """``steps`` batches of ``batch`` rows of each domain."""
    return [[ds.train.rows(chunk).to(DEVICE) for chunk in chunks] for chunks in _domain_rows(ds, steps, batch)]


ADAM = TrainConfig(lr=1e-3)  # the stages' dense Adam settings


def _model(ds: MultiDomainDataset, backend: str, *, lazy: bool, experts_per_domain: int = 1) -> CTRModel:
    model = models.build("deepfm", ds, TowerKind.MOE_MLORA, experts_per_domain=experts_per_domain)
    _set_backend(model, backend, torch.device(DEVICE))  # as fit does (on CUDA: torch embeddings)
    if lazy:
        set_embedding_optimizer(model, LazyAdam(lr=1e-3))  # every table, as fit does
    return model.to(DEVICE)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _staged_round(
    model: CTRModel, batches: list[list[Batch]], backend: str, mix: str = "equal-steps",
    precision: Precision = Precision.FP32,
) -> Callable[[], int]:
    """One round of shortened staged training; returns the number of training samples.

    ``mix``: ``"equal-steps"`` gives every stage ``STEPS`` steps (so 10 of 12 stages are expert
    stages); ``"fit-rows"`` spreads rows as ``fit`` does in an epoch, where each expert stage
    sees its own domain and the backbone and gate stages see every domain: ``STEPS`` steps per
    expert stage and ``STEPS * D`` for each of the other two.
    """
    plan = plan_stages(model, MLoRAMode.JOINT)
    tables = _table_ids(model)
    num_domains = len(batches)
    shared_steps = STEPS if mix == "equal-steps" else STEPS * num_domains

    def stage_batches(step: StageStep) -> list[Batch]:
        if step.expert is not None:
            return batches[model.tower.expert_domain(step.expert)][:STEPS]
        # All domains: single-domain batches, a different domain each step.
        return [batches[i % num_domains][i // num_domains] for i in range(shared_steps)]

    def run() -> int:
        samples = 0
        model.train()
        for step in plan:
            params = set_stage(model, step, train_backbone=False)
            optimizer = stage_optimizer([p for p in params if id(p) not in tables], ADAM, backend)
            l2_params = l2_parameters(model)
            for batch in stage_batches(step):
                train_step(model, batch, step, optimizer, 1e-5, l2_params, precision)
                samples += len(batch)
        _sync()
        return samples

    return run


def _record(benchmark: Any, samples: int, **info: Any) -> None:
    benchmark.extra_info.update(info, samples_per_round=samples)
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["samples_per_second"] = samples / benchmark.stats.stats.median


PRESETS = [pytest.param("paper", False, id="paper-adam"), pytest.param("wide", True, id="wide-lazyadam")]


@pytest.mark.parametrize("precision", [p.value for p in Precision])
@pytest.mark.parametrize("mix", ["equal-steps", "fit-rows"])
@pytest.mark.parametrize(("preset", "lazy"), PRESETS)
@pytest.mark.parametrize("provider", ["reference", "fast"])
def test_train(benchmark: Any, provider: str, preset: str, lazy: bool, mix: str, precision: str) -> None:
    """Staged training samples/s; ``precision``: TrainConfig.precision (issue 27's table: fast
    and reference in fp32 and bf16-mixed, side by side in one run)."""
    if mix != "equal-steps" and precision != Precision.FP32.value:
        pytest.skip("bf16-mixed is measured on the equal-steps mix")
    ds = _dataset(preset)
    model = _model(ds, provider, lazy=lazy)
    run = _staged_round(model, _domain_batches(ds, STEPS, BATCH), provider, mix, Precision(precision))
    benchmark.group = f"train-{preset}" if mix == "equal-steps" else f"train-{preset}-{mix}"
    samples = run()  # warm-up: Adam state, allocator, first-call costs
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    _record(benchmark, samples, provider=provider, preset=preset, device=DEVICE, batch=BATCH,
            embedding_optimizer="lazy-adam" if lazy else "adam", mode="staged-train", mix=mix,
            precision=precision, cpu_flags=_cpu_flags())


@pytest.mark.parametrize("table_precision", [p.value for p in TablePrecision])
def test_train_half_tables(benchmark: Any, table_precision: str) -> None:
    """Staged training on ``wide`` (fast path, lazy Adam in every arm) with fp32, fp16 and bf16
    tables (issue 28), side by side in one run. In the staged round the tables train in the
    backbone stage only (1 of 12 stages); the other stages read them."""
    if not _ext.available():
        pytest.skip("half tables need the C++ engine (moefast._C)")
    ds = _dataset("wide")
    model = _model(ds, "fast", lazy=True)
    for collection in embedding_collections(model):
        collection.set_precision(TablePrecision(table_precision))
    run = _staged_round(model, _domain_batches(ds, STEPS, BATCH), "fast")
    benchmark.group = "train-wide-table-precision"
    samples = run()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    _record(benchmark, samples, provider="fast", preset="wide", device=DEVICE, batch=BATCH,
            embedding_optimizer="lazy-adam", mode="staged-train", table_precision=table_precision,
            cpu_flags=_cpu_flags())


def _cpu_flags() -> str:
    """The CPU's SIMD flags that decide bf16 speed (issue 27: say which CPU produced a figure)."""
    flags = cpu_flags() or frozenset()
    return " ".join(sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")))


@pytest.mark.parametrize(("preset", "lazy"), PRESETS)
@pytest.mark.parametrize("provider", ["reference", "fast"])
def test_evaluate(benchmark: Any, provider: str, preset: str, lazy: bool) -> None:
    ds = _dataset(preset)
    model = _model(ds, provider, lazy=lazy)
    rows = torch.arange(min(EVAL_ROWS, len(ds.test)))
    benchmark.group = f"evaluate-{preset}"

    def run() -> None:
        predict(model, ds.test, rows=rows, batch_size=32768, device=DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _record(benchmark, len(rows), provider=provider, preset=preset, device=DEVICE, mode="evaluate")


TOWER_NODES = {"one-node": "fast", "python-node": "fast-python-node-tower", "per-layer": "fast-per-layer-tower"}


@pytest.mark.parametrize("batch", [64, BATCH])
@pytest.mark.parametrize("tower", list(TOWER_NODES))
def test_tower_node(benchmark: Any, tower: str, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast CPU tower as one C++ autograd node (``torch.ops.moefast.tower``, what ``fast``
    runs) against the same node in Python (``CpuTowerFunction``, its specification) and against
    one node per layer (``Tower``'s own loop over its layers), on ``paper``'s staged round. At
    batch 64 a step is mostly fixed dispatch cost, which is what the one node cuts."""
    if DEVICE != "cpu":
        pytest.skip("the one-node tower is the CPU fast path")
    if tower == "one-node" and not _ext.tower_op_available():
        pytest.skip("moefast._tower_ops is not built")
    if tower == "python-node":
        monkeypatch.setattr(_ext, "tower_op_available", lambda: False)
    if tower == "per-layer":
        monkeypatch.setattr(Tower, "_runs_fused", lambda self, x: False)
    ds = _dataset("paper")
    model = _model(ds, "fast", lazy=False)
    run = _staged_round(model, _domain_batches(ds, STEPS, batch), "fast")
    benchmark.group = f"tower-node-paper-batch{batch}"
    samples = run()
    benchmark.pedantic(run, rounds=4 * ROUNDS, iterations=1)
    _record(benchmark, samples, provider=TOWER_NODES[tower],
            preset="paper", device=DEVICE, batch=batch, embedding_optimizer="adam", mode="staged-train")


# ---------------------------------------------------------------------------------------------
# Peer: DeepCTR-Torch's DeepFM on the same data
# ---------------------------------------------------------------------------------------------


def _deepctr_deepfm(ds: MultiDomainDataset) -> tuple[torch.nn.Module, Callable[[Batch], torch.Tensor]]:
    deepctr = pytest.importorskip("deepctr_torch")
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

    columns: list[Any] = []
    for f in ds.features:
        sparse = SparseFeat(f.name, f.vocab_size, embedding_dim=f.dim)
        if f.multi_valued:
            width = int(ds.train.features[f.name].shape[1])
            columns.append(VarLenSparseFeat(sparse, maxlen=width, combiner=f.pooling.value))
        else:
            columns.append(sparse)
    model = deepctr.models.DeepFM(columns, columns, dnn_hidden_units=(256, 128, 64), dnn_dropout=0.5,
                                  device=DEVICE)

    def inputs(batch: Batch) -> torch.Tensor:
        # DeepCTR takes one float matrix, fields in its feature_index order (ids < 2^24: exact).
        parts = [batch.features[name].reshape(len(batch), -1).float() for name in model.feature_index]
        return torch.cat(parts, dim=1)

    return model, inputs


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("preset", ["paper", "wide"])
def test_train_peer_deepctr_deepfm(benchmark: Any, preset: str, autocast: bool) -> None:
    """DeepCTR-Torch's DeepFM stepped by hand, in fp32 and under ``torch.autocast(bfloat16)``
    (the form a PyTorch user tries first)."""
    ds = _dataset(preset)
    model, inputs = _deepctr_deepfm(ds)
    batches = [(inputs(b), b.label) for per_domain in _domain_batches(ds, STEPS, BATCH) for b in per_domain]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    benchmark.group = f"train-{preset}"

    def run() -> int:
        model.train()
        for x, y in batches:
            with torch.autocast(DEVICE, torch.bfloat16, enabled=autocast):
                pred = model(x).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy(pred.float(), y) + model.get_regularization_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync()
        return len(batches) * BATCH

    samples = run()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    _record(benchmark, samples, provider="deepctr-deepfm", preset=preset, device=DEVICE, batch=BATCH,
            embedding_optimizer="adam", mode="plain-train",
            precision="autocast-bf16" if autocast else "fp32", cpu_flags=_cpu_flags())


def test_train_peer_deepctr_deepfm_fit(benchmark: Any) -> None:
    """The peer as its users run it: ``compile("adam", "binary_crossentropy")`` and ``fit`` over
    the same rows in the same order (batch 1024, no shuffling, no validation, silent)."""
    ds = _dataset("paper")
    model, _ = _deepctr_deepfm(ds)
    model.compile("adam", "binary_crossentropy")
    rows = torch.cat([chunk for chunks in _domain_rows(ds, STEPS, BATCH) for chunk in chunks])
    x = {f.name: ds.train.features[f.name][rows].numpy() for f in ds.features}
    y = ds.train.label[rows].numpy()
    benchmark.group = "train-paper"

    def run() -> int:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        return len(rows)

    samples = run()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    _record(benchmark, samples, provider="deepctr-deepfm-fit", preset="paper", device=DEVICE, batch=BATCH,
            embedding_optimizer="adam", mode="plain-train")


# ---------------------------------------------------------------------------------------------
# Scaling of the fast path
# ---------------------------------------------------------------------------------------------

SCALING = [
    pytest.param(dict(batch=b, num_domains=10, experts=1, num_users=300), id=f"batch{b}")
    for b in (256, 1024, 4096)
] + [
    pytest.param(dict(batch=1024, num_domains=d, experts=1, num_users=300), id=f"domains{d}")
    for d in (2, 20)
] + [
    pytest.param(dict(batch=1024, num_domains=10, experts=k, num_users=300), id=f"experts{k}")
    for k in (2, 4)
] + [
    pytest.param(dict(batch=1024, num_domains=10, experts=1, num_users=u), id=f"users{u}")
    for u in (100_000, 3_000_000)
]


@pytest.mark.parametrize("knobs", SCALING)
def test_scaling(benchmark: Any, knobs: dict[str, int]) -> None:
    ds = _dataset("paper", num_domains=knobs["num_domains"], num_users=knobs["num_users"])
    model = _model(ds, "fast", lazy=True, experts_per_domain=knobs["experts"])
    step = plan_stages(model, MLoRAMode.JOINT)[-1]  # the gate stage: the full mixture
    params = set_stage(model, step, train_backbone=True)
    tables = _table_ids(model)
    optimizer = stage_optimizer([p for p in params if id(p) not in tables], ADAM, "fast")
    # Mixed-domain batches: every expert of the mixture is in play.
    idx = torch.arange(4 * knobs["batch"]) % len(ds.train)
    batches = [ds.train.rows(chunk).to(DEVICE) for chunk in idx.split(knobs["batch"])]
    benchmark.group = "scaling"

    l2_params = l2_parameters(model)

    def run() -> None:
        for batch in batches:
            train_step(model, batch, step, optimizer, 1e-5, l2_params)
        _sync()

    run()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    _record(benchmark, len(batches) * knobs["batch"], provider="fast", device=DEVICE,
            mode="full-mixture-train-step", steps=len(batches), **knobs)
