"""The fast path end to end (issue 6): staged training under ``backend="fast"`` runs the fast
components, matches the reference step by step, and its checkpoints evaluate identically under
either backend.

CPU: the fast path is the C++ embedding engine plus the CPU tower layer (concatenated experts, one
autograd node per layer; moefast/ops/_adapter_cpu.py). CUDA (when
present, marker ``gpu``): the fused Triton tower.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moefast
from moefast import data, models, train
from moefast.config import EmbeddingOptimizer, TowerConfig, TowerKind
from moefast.data.dataset import MultiDomainDataset
from moefast.models.base import CTRModel
from moefast.ops import adapter as adapter_ops
from moefast.ops import embedding as embedding_ops
from moefast.ops._backend import Backend
from moefast.runs.checkpoint import load_checkpoint, save_checkpoint
from moefast.testing import TRAINING_LOSS_TOLERANCE, TRAINING_PARITY_STEPS, WAUC_PARITY_ATOL
from moefast.train.loop import (
    _set_backend,
    embedding_collections,
    predict,
    set_embedding_optimizer,
    stage_optimizer,
    train_step,
)
from moefast.train.metrics import evaluate_scores
from moefast.train.stages import plan_stages, set_stage

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]

# Small tower, 2 domains x 2 experts: every stage kind (backbone, expert, gate) with a few dozen
# steps each at batch 64, in seconds on 2 cores.
TOWER = TowerConfig(kind=TowerKind.MOE_MLORA, hidden_units=(32, 16), ranks=(4, 2), experts_per_domain=2)


@pytest.fixture(scope="module")
def dataset() -> MultiDomainDataset:
    return data.load("synthetic", preset="paper", seed=123, rows=4000, num_domains=2)


def _build(dataset: MultiDomainDataset, backend: str) -> CTRModel:
    return models.build("deepfm", dataset, "moe-mlora", tower_config=TOWER, experts_per_domain=2,
                        backend=backend)


def _config(device: str, embedding_optimizer: EmbeddingOptimizer = EmbeddingOptimizer.ADAM) -> moefast.TrainConfig:
    return moefast.TrainConfig(max_epochs=2, batch_size=64, progress=False, device=device,
                               embedding_optimizer=embedding_optimizer)


def test_fast_backend_runs_the_fast_components(
    dataset: MultiDomainDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``fast`` (and ``auto``, which is fast on CPU) no reference op is called in training."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fast backend called a reference op")

    monkeypatch.setattr(embedding_ops._ref, "embedding_collection", refuse)
    monkeypatch.setattr(adapter_ops._reference, "adapter_linear", refuse)
    for backend in ("fast", "auto"):
        model = _build(dataset, backend)
        for step in plan_stages(model, moefast.config.MLoRAMode.JOINT):
            params = set_stage(model, step, train_backbone=False)
            optimizer = torch.optim.Adam(params, lr=1e-3)
            batch = dataset.train.rows(torch.arange(64))
            assert torch.isfinite(torch.tensor(train_step(model, batch, step, optimizer, 1e-5)))
    # The spy itself works: the reference backend does reach it.
    batch = dataset.train.rows(torch.arange(8))
    with pytest.raises(AssertionError, match="reference op"):
        _build(dataset, "reference")(batch.features, batch.domain)


@pytest.mark.parametrize("embedding_optimizer", list(EmbeddingOptimizer), ids=lambda o: o.value)
@pytest.mark.parametrize("device", DEVICES)
def test_staged_training_parity_and_checkpoints(
    dataset: MultiDomainDataset, device: str, embedding_optimizer: EmbeddingOptimizer, tmp_path: Path
) -> None:
    """Same seed, same data, same embedding optimizer (like with like): per-step losses agree
    for the first steps of every stage, test WAUC agrees, and the fast run's final checkpoint
    evaluates the same under the reference."""
    results = {}
    trained = {}
    for backend in ("reference", "fast"):
        trained[backend] = _build(dataset, backend)
        results[backend] = train.fit(trained[backend], dataset, _config(device, embedding_optimizer),
                                     backend=backend)
    ref, fast = results["reference"], results["fast"]
    assert [s.label for s in ref.stages] == [s.label for s in fast.stages]
    assert [s.label for s in ref.stages][:1] == ["backbone"] and ref.stages[-1].label == "gate"
    tol = TRAINING_LOSS_TOLERANCE
    for a, b in zip(ref.stages, fast.stages, strict=True):
        steps = min(TRAINING_PARITY_STEPS, len(a.losses))
        assert steps > 0 and len(b.losses) >= steps, a.label
        torch.testing.assert_close(
            torch.tensor(b.losses[:steps]), torch.tensor(a.losses[:steps]), rtol=tol.rtol, atol=tol.atol,
            msg=lambda m, label=a.label: f"stage {label}: {m}",
        )
    assert abs(fast.metrics["test"]["wauc"] - ref.metrics["test"]["wauc"]) <= WAUC_PARITY_ATOL
    assert fast.metrics["backend"] == "fast"

    # The fast run's final weights as a checkpoint, loaded strictly into a fresh reference model.
    checkpoint = save_checkpoint(tmp_path / "fast.pt", trained["fast"], "gate")
    reloaded = _build(dataset, "reference")
    set_embedding_optimizer(reloaded, trained["fast"].embedding.optimizer)  # its state is saved too
    reloaded.to(device)
    load_checkpoint(checkpoint, reloaded, expected_stage="gate")
    logits = predict(reloaded, dataset.test, device=device)
    test = evaluate_scores(logits, dataset.test.label, dataset.test.domain, dataset.domain_names)
    assert abs(test.wauc - fast.metrics["test"]["wauc"]) <= WAUC_PARITY_ATOL
    # Both backends compute the same function of the same weights: the logits agree to fp32.
    torch.testing.assert_close(logits, fast.test_logits, rtol=tol.rtol, atol=tol.atol)


def test_sparse_embedding_optimizer_touches_only_the_rows_seen(dataset: MultiDomainDataset) -> None:
    """Lazy Adam / row-wise Adagrad update only the rows of the batches; dense Adam moves all.
    That holds for every table: the field embeddings and DeepFM's first-order weights."""
    config = moefast.TrainConfig(max_epochs=1, batch_size=64, progress=False)
    for optimizer in EmbeddingOptimizer:
        model = _build(dataset, "fast")
        collections = embedding_collections(model)
        assert len(collections) == 2  # DeepFM: embeddings and first-order weights
        before = [c.tables["uid"].detach().clone() for c in collections]
        train.fit(model, dataset, replace(config, embedding_optimizer=optimizer, max_epochs=1))
        seen = torch.zeros(len(before[0]), dtype=torch.bool)
        seen[dataset.train.features["uid"].unique()] = True
        assert (~seen).any(), "the data must leave some users out of the train split"
        for collection, old in zip(collections, before, strict=True):
            moved = (collection.tables["uid"].detach() != old).any(dim=1)
            if optimizer is EmbeddingOptimizer.ADAM:
                assert moved[~seen].all(), "dense Adam (and the L2 penalty) move every row"
            else:
                assert not moved[~seen].any(), optimizer
                assert moved[seen].any(), optimizer


def test_cli_embedding_optimizer_flag() -> None:
    """``--embedding-optimizer`` / ``--embedding-lr`` reach TrainConfig; a bad value is refused."""
    from moefast import cli
    from moefast.cli._options import given_options
    from moefast.cli.train import resolve_config

    args = cli.build_parser().parse_args(
        ["train", "--backend", "fast", "--embedding-optimizer", "rowwise-adagrad", "--embedding-lr", "0.05"]
    )
    config, _ = resolve_config(given_options(args))
    assert config.backend == "fast"
    assert config.train.embedding_optimizer is EmbeddingOptimizer.ROWWISE_ADAGRAD
    assert config.train.embedding_lr == 0.05
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--embedding-optimizer", "sgd"])
    with pytest.raises(TypeError, match="embedding_optimizer"):
        moefast.TrainConfig(embedding_optimizer="lazy-adam")  # type: ignore[arg-type]


def test_fast_on_cuda_means_triton_tower_and_torch_embeddings(dataset: MultiDomainDataset) -> None:
    """The C++ engine is CPU-only: on a CUDA device ``fit``'s ``fast`` sets the embeddings to
    the reference (torch) lookup and the tower to fast; on CPU everything is fast. (Only the
    device type is read: this runs without a GPU.)"""
    for device, embedding_backend in (("cpu", Backend.FAST), ("cuda", Backend.REFERENCE)):
        model = _build(dataset, "reference")
        assert _set_backend(model, "fast", torch.device(device)) == "fast"
        assert model.embedding.backend is embedding_backend, device
        towers = [m for m in model.modules() if isinstance(m, moefast.nn.AdapterLinear)]
        assert towers and all(m.backend is Backend.FAST for m in towers), device


def test_stage_optimizer_is_torchs_fused_adam_off_the_reference() -> None:
    """Same Adam settings everywhere; fast and auto take torch's fused implementation."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    config = moefast.TrainConfig(lr=0.01, betas=(0.8, 0.9), eps=1e-7)
    for backend, fused in (("fast", True), ("auto", True), ("reference", None)):
        optimizer = stage_optimizer(params, config, backend)
        assert optimizer.defaults["fused"] is fused, backend
        assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["eps"]) == (0.01, (0.8, 0.9), 1e-7)
