"""``fit``: staged training with early stopping, checkpoints and the run directory.

Per stage (see :mod:`moefast.train.stages`): a fresh Adam over exactly the stage's parameters;
epochs of single-domain batches (the order of domains shuffled each epoch) or mixed batches;
after every epoch the validation AUC decides early stopping (strict improvement, patience
``TrainConfig.patience``, at most ``max_epochs``); the stage ends restored to its best weights
and writes its checkpoint, which the next stage loads strictly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moefast.config import (
    BatchMode,
    EmbeddingOptimizer,
    ExpertStopRule,
    Precision,
    PretrainedMode,
    TrainConfig,
)
from moefast.data.batching import BatchLoader, BatchOrder
from moefast.data.dataset import Batch, MultiDomainDataset, Split
from moefast.data.stream import StreamedDataset, StreamLoader
from moefast.log import progress_bar, say
from moefast.models.base import CTRModel
from moefast.nn.adapter import AdapterLinear
from moefast.nn.embedding import EmbeddingCollection
from moefast.ops._backend import Backend, BackendLike, parse_backend
from moefast.precision import check_device as check_precision
from moefast.reference.embedding_optim import FusedOptimizer, LazyAdam, RowwiseAdagrad
from moefast.runs.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from moefast.runs.files import CHECKPOINTS
from moefast.runs.rundir import RunDirectory, claim_run_dir, write_run, write_scored_predictions
from moefast.runs.settings import backend_name, check_settings, dataset_settings, settings_record
from moefast.runs.snapshot import (
    SETTINGS,
    SNAPSHOT,
    SNAPSHOT_SECONDS,
    Preempted,
    check_adam_state,
    check_resumable,
    check_stage_state,
    load_snapshot,
    preemption,
    restore_snapshot,
    rng_state,
    save_snapshot,
    state_fingerprint,
)
from moefast.runs.writer import fault_step
from moefast.train import streamed
from moefast.train.errors import CapWarning, NonFiniteError
from moefast.train.metrics import EvalMetrics, evaluate_scores
from moefast.train.parallel import data_parallel as distributed
from moefast.train.parallel.single import SingleProcess
from moefast.train.stages import (
    Stage,
    StageStep,
    apply_frozen_path_dropout,
    mask_gradients,
    plan_stages,
    set_stage,
    stage_state_keys,
)

# The job this process trains in: alone, or one rank of a data-parallel job (the same methods).
Parallel = SingleProcess | distributed.DataParallel
# What fit trains on: a dataset in memory, or a log read as training goes (moefast.train.streamed).
Dataset = MultiDomainDataset | StreamedDataset

__all__ = [
    "CapWarning",
    "EarlyStopping",
    "FitResult",
    "NonFiniteError",
    "StageRecord",
    "check_device",
    "embedding_collections",
    "fit",
    "l2_parameters",
    "predict",
    "set_embedding_optimizer",
    "stage_optimizer",
    "train_step",
]


def _refuse_non_finite_scores(logits: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        raise NonFiniteError(
            f"{what}: {int(bad.sum())} of {logits.numel()} scores are not finite (the first is "
            f"{float(logits[bad][0])}); training diverged, so no AUC is computed. Try a smaller lr "
            "(or embedding_lr), or a smaller l2."
        )


class EarlyStopping:
    """Strict-improvement early stopping with patience.

    ``update(value)`` returns ``True`` when ``value`` beats the best so far (strictly; NaN never
    does); ``should_stop`` turns ``True`` after ``patience`` updates in a row without one.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.best = -math.inf
        self.stale = 0

    def update(self, value: float) -> bool:
        if value > self.best:
            self.best = value
            self.stale = 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience


@dataclass
class StageRecord:
    """What one stage did. ``val_history`` holds the early-stopping AUC after each epoch;
    ``losses`` the training loss of every step, in order (what backend parity compares)."""

    label: str
    epochs: int
    best_val_mean_auc: float
    seconds: float
    train_samples: int
    train_seconds: float
    val_history: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)
    # SHA-256 of the checkpoint file as written; a resume refuses a checkpoint that differs.
    checkpoint_sha256: str | None = None
    # Where the best validation was (None: no improvement in this stage), and what ended the
    # stage: "patience" (early stopping; also when patience runs out on the cap's last step) or
    # "cap" (max_steps / max_epochs while still improving within patience).
    best_epoch: int | None = None
    best_step: int | None = None
    stopped_by: str | None = None
    val_loss_history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """One entry of ``metrics.json``'s ``stages``."""
        best = None if math.isnan(self.best_val_mean_auc) else self.best_val_mean_auc
        return {
            "stage": self.label,
            "epochs": self.epochs,
            "steps": len(self.losses),
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "stopped_by": self.stopped_by,
            "capped": self.stopped_by == "cap",
            "best_val_mean_auc": best,
            "seconds": self.seconds,
            "val_history": [None if math.isnan(v) else v for v in self.val_history],
            "val_logloss_history": [None if math.isnan(v) else v for v in self.val_loss_history],
        }


@dataclass
class FitResult:
    """``metrics`` is the ``metrics.json`` dict; ``test_logits`` are in test-split row order."""

    metrics: dict[str, Any]
    test: EvalMetrics
    stages: list[StageRecord]
    test_logits: torch.Tensor
    gate_weights: torch.Tensor | None
    run_dir: Path | None
    # The test rows' labels and domains in the order of ``test_logits`` (the predictions file).
    test_label: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    test_domain: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    # A streamed run's predictions.parquet, written while the test split was scored.
    predictions_written: bool = False


def method_name(model: CTRModel) -> str:
    return model.tower.kind.value


def _set_backend(model: CTRModel, backend: BackendLike, device: torch.device | None = None) -> str:
    """Point every moefast layer at ``backend``; return the name recorded in metrics.json.

    On CUDA the model-level ``fast`` backend is the fused Triton tower with torch's embedding
    lookup: the C++ embedding engine is CPU-only and there is no GPU embedding kernel, so the
    embeddings are set to ``reference`` there (said here, not a silent fallback per call).
    """
    if backend is None:
        return backend_name(None)  # the layers, as built, resolve the same per call
    chosen = parse_backend(backend)
    on_cuda = device is not None and device.type == "cuda"
    for module in model.modules():
        if isinstance(module, EmbeddingCollection) and on_cuda and chosen is Backend.FAST:
            module.backend = Backend.REFERENCE
        elif isinstance(module, AdapterLinear | EmbeddingCollection):
            module.backend = chosen
    return chosen.value


def stage_optimizer(
    params: list[torch.nn.Parameter], config: TrainConfig, backend: str
) -> torch.optim.Adam:
    """The stage's dense Adam over ``params`` (``backend`` as :func:`_set_backend` returns it).

    Same update rule under every backend; the fast and auto backends run torch's fused Adam (one
    multi-tensor kernel per step, about 3x faster than the reference's loop over parameters at
    tower sizes on CPU).
    """
    fused = True if backend != Backend.REFERENCE.value else None
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)


def _fused_embedding_optimizer(config: TrainConfig) -> FusedOptimizer | None:
    """The sparse optimizer fused into the embedding backward, or ``None`` for dense Adam."""
    lr = config.embedding_lr if config.embedding_lr is not None else config.lr
    if config.embedding_optimizer is EmbeddingOptimizer.LAZY_ADAM:
        return LazyAdam(lr=lr, beta1=config.betas[0], beta2=config.betas[1], eps=config.eps, seed=config.seed)
    if config.embedding_optimizer is EmbeddingOptimizer.ROWWISE_ADAGRAD:
        return RowwiseAdagrad(lr=lr, eps=config.eps, seed=config.seed)
    return None


def embedding_collections(model: CTRModel) -> list[EmbeddingCollection]:
    """Every embedding table group of ``model``: the field embeddings, and the first-order
    weights of backbones that have them (``CTRModel.first_order``)."""
    return [m for m in model.modules() if isinstance(m, EmbeddingCollection)]


def set_embedding_optimizer(model: CTRModel, optimizer: FusedOptimizer | None) -> None:
    """Fuse ``optimizer`` into the backward of every embedding table of ``model`` (``None``:
    the tables join the stage's dense Adam). The first-order weights are tables of the same
    vocabularies, so a production-size vocabulary makes them as costly to update densely."""
    for collection in embedding_collections(model):
        if optimizer is not None or collection.optimizer is not None:
            collection.set_optimizer(optimizer)


def _table_ids(model: CTRModel) -> set[int]:
    """``id`` of every embedding table a fused optimizer updates (empty under dense Adam)."""
    return {id(p) for c in embedding_collections(model) if c.optimizer is not None for p in c.tables.parameters()}


def _dense_optimizer(
    model: CTRModel, params: list[torch.nn.Parameter], config: TrainConfig, backend: str
) -> torch.optim.Adam:
    """:func:`stage_optimizer` over ``params`` less the tables a fused embedding optimizer
    updates (inside the embedding backward, not by Adam)."""
    fused = _table_ids(model)
    return stage_optimizer([p for p in params if id(p) not in fused], config, backend)


_ORDER = {BatchMode.SINGLE_DOMAIN: BatchOrder.BY_DOMAIN, BatchMode.MIXED: BatchOrder.MIXED}


def predict(
    model: CTRModel,
    split: Split,
    *,
    rows: torch.Tensor | None = None,
    batch_size: int = 32768,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits float32 ``[len(rows)]`` (default: every row of ``split``, in order) in eval mode,
    under the tower's current routing."""
    index = torch.arange(len(split)) if rows is None else rows
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for chunk in index.split(batch_size):
            batch = split.rows(chunk).to(device)
            out.append(model(batch.features, batch.domain).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def l2_parameters(model: CTRModel) -> list[torch.nn.Parameter]:
    """What the L2 penalty covers in the current stage (call after ``set_stage``): the
    regularised tensors that train, less the tables a fused embedding optimizer updates (its
    update ignores ``.grad``, and a dense penalty would touch every row of production-size
    tables each step)."""
    fused = _table_ids(model)
    return [p for p in model.regularized_parameters() if p.requires_grad and id(p) not in fused]


def train_step(
    model: CTRModel,
    batch: Batch,
    step: StageStep,
    optimizer: torch.optim.Optimizer,
    l2: float,
    l2_params: list[torch.nn.Parameter] | None = None,
    precision: Precision = Precision.FP32,
) -> float:
    """One optimizer step on ``batch``: BCE + ``l2`` * (squared norm of ``l2_params``, by default
    :func:`l2_parameters`; a stage's loop passes the list it computed once); returns the loss.
    ``precision``: the forward's arithmetic (:func:`step_precision`)."""
    params = (l2_parameters(model) if l2_params is None else l2_params) if l2 > 0 else []
    return SingleProcess(batch.label.device).train_step(
        model, model, batch, step.label, optimizer, l2, params,
        after_backward=lambda m: mask_gradients(m, step), precision=precision)


def _train_epoch(
    model: CTRModel,
    loader: BatchLoader | StreamLoader,
    step: StageStep,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    device: torch.device,
    desc: str,
    losses: list[float],
    parallel: Parallel,
    runner: torch.nn.Module,
    *,
    skip: int = 0,
    after_step: Callable[[int, int], str | None] | None = None,
) -> tuple[int, int]:
    """Train one epoch of ``loader``; return the rows trained and the batches drawn (the skipped
    ones included).

    ``skip`` batches of the epoch were trained before a resume (they are drawn, so the epoch's
    order is the same, and not trained again). ``after_step(batches done, rows trained in this
    call)`` runs after each step
    (and may validate there); when it returns ``"preempt"`` the epoch stops with
    :class:`_Stopped`, when it returns ``"end"`` (the stage is over) the epoch stops there and
    returns.
    """
    model.train()
    samples = 0
    drawn = 0
    l2_params = l2_parameters(model)  # the stage's freezing is fixed for the epoch
    bar = progress_bar(enabled=config.progress, total=loader.num_rows, desc=desc, unit="row", leave=False)
    try:
        # A batch is the global batch, or (a streamed run's rank) this rank's rows of it: ``rows``.
        for number, (cpu_batch, rows) in enumerate(parallel.batches(loader)):
            drawn = number + 1
            if number < skip:
                bar.update(len(cpu_batch))
                continue
            try:
                # Under data parallelism: this rank's slice of the global batch.
                losses.append(parallel.train_step(
                    model, runner, cpu_batch, step.label, optimizer, config.l2, l2_params,
                    after_backward=lambda m: mask_gradients(m, step), precision=config.precision, rows=rows,
                ))
            except NonFiniteError as exc:
                detail = str(exc).removeprefix(f"{step.label}: ")
                raise NonFiniteError(f"{desc}, batch {number}: {detail}") from None
            samples += len(cpu_batch) if rows is None else rows[2]
            bar.update(len(cpu_batch))
            action = None if after_step is None else after_step(number + 1, samples)
            if action == "preempt":
                raise _Stopped(number + 1, samples)
            if action == "end":
                break
    finally:
        bar.close()
    return samples, drawn


class _Stopped(Exception):
    """The epoch stopped at a step boundary because ``SIGTERM`` asked the run to stop."""

    def __init__(self, batches: int, samples: int) -> None:
        super().__init__(batches, samples)
        self.batches = batches
        self.samples = samples


def fit(
    model: CTRModel,
    dataset: Dataset,
    config: TrainConfig,
    *,
    backend: BackendLike = None,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> FitResult:
    """Train ``model`` on ``dataset`` through its stages; evaluate on the test split.

    Args:
        model: from :func:`moefast.models.build` (fresh weights; the stages start from them).
        dataset: the splits; ``train`` trains, ``val`` early-stops, ``test`` is reported. A
            :class:`~moefast.data.stream.StreamedDataset` is read as training goes
            (:mod:`moefast.train.streamed`); its test predictions are ``predictions.parquet``.
        config: optimisation, batching, staging and early stopping.
        backend: ``reference`` | ``fast`` | ``auto``, set on every moefast layer (``None``
            leaves the layers as built). Parameters are the same under every backend.
        out_dir: the run directory (``settings.json``, checkpoints, ``metrics.json``,
            ``predictions.csv``, plots); ``None`` keeps the checkpoints in a temporary folder. The
            directory belongs to this run (:func:`moefast.runs.rundir.claim_run_dir`): it gets
            moefast's marker and a lock, and one that holds anything else is refused.
        overwrite: clear ``out_dir`` first when it holds a previous moefast run (only a
            directory carrying the marker, never an arbitrary folder).
        resume: continue the run ``out_dir`` holds from its resume snapshot (the last epoch it
            completed, or the step where ``SIGTERM`` stopped it; see :mod:`moefast.runs.snapshot`),
            ending bitwise equal to an uninterrupted run on CPU. ``model``, ``dataset``,
            ``config`` and ``backend`` must be the first run's (``settings.json``; otherwise a
            ``ValueError`` names the keys that differ). A directory without a snapshot (killed
            before its first epoch ended, or missing) starts from the beginning; a finished run
            only recomputes its outputs.

    Returns:
        A :class:`FitResult` whose ``metrics`` follow DESIGN.md section 5's schema.

    Raises:
        moefast.runs.rundir.RunDirectoryError: ``out_dir`` cannot be written, is not empty and
            not a moefast run directory, holds a previous run without ``overwrite`` or
            ``resume``, or is in use by another live process (a ``ValueError``).
        moefast.runs.snapshot.Preempted: ``SIGTERM`` stopped the run at a step boundary; its
            state is saved for ``resume``.
        moefast.runs.writer.WriteError: a file of the run could not be written (a full disk);
            nothing was left under its final name, and the run resumes from its last snapshot.
    """
    if model.num_domains != dataset.num_domains:
        raise ValueError(
            f"model built for {model.num_domains} domains, dataset {dataset.name!r} has {dataset.num_domains}"
        )
    if out_dir is None:
        if overwrite or resume:
            raise ValueError(f"fit({'overwrite' if overwrite else 'resume'}=True) needs an out_dir")
        return _fit(model, dataset, config, backend, None)
    parallel = distributed.current(config.device)
    if parallel is not None and not parallel.is_writer:
        # Rank 0 alone writes; resuming, every rank reads its snapshot (one machine, or a
        # shared file system), so that all continue from the same state.
        return _fit(model, dataset, config, backend, None, resume_from=Path(out_dir) if resume else None,
                    job_dir=Path(out_dir))
    with claim_run_dir(out_dir, overwrite=overwrite, resume=resume) as run_dir:
        return _fit(model, dataset, config, backend, run_dir, resume=resume)


def _fit(
    model: CTRModel,
    dataset: Dataset,
    config: TrainConfig,
    backend: BackendLike,
    claim: RunDirectory | None,
    *,
    resume: bool = False,
    resume_from: Path | None = None,
    job_dir: Path | None = None,
) -> FitResult:
    """:func:`fit` in the run directory ``claim`` (``None``: none, or a data-parallel rank other
    than 0, which reads the job's snapshot from ``resume_from`` and names ``job_dir`` when
    preempted): open the run, train the plan's stages, score the test split and write the outputs."""
    out_dir = None if claim is None else claim.path
    backend_name = _prepare_model(model, backend, config)
    parallel: Parallel = distributed.current(config.device) or SingleProcess(torch.device(config.device))
    snapshot, settings_digest = _open_run(out_dir, model, dataset, config, backend_name, parallel, resume, resume_from)
    device = parallel.device
    model.to(device)
    torch.manual_seed(config.seed)  # dropout masks
    generator = torch.Generator().manual_seed(config.seed)  # batch and domain order
    plan = plan_stages(model, config.mlora_mode)
    records: list[StageRecord] = []
    in_stage: dict[str, Any] | None = None
    if snapshot is not None:
        source = out_dir if out_dir is not None else resume_from
        assert source is not None
        records, in_stage = restore_snapshot(source / SNAPSHOT, snapshot, [step.label for step in plan],
                                             functools.partial(_record_from_state, source / CHECKPOINTS), generator, device)
    restored = len(records) if snapshot is not None and in_stage is None else -1
    carried_adam = _carried_optimizer(model, plan, config, backend_name, snapshot if in_stage is None else None)
    parallel.run_dir = out_dir if out_dir is not None else job_dir
    # Under data parallelism every rank of a job with a run directory listens: SIGTERM may reach
    # any of them first.
    with _checkpoint_dir(out_dir, records) as ckpt_dir, preemption(parallel.run_dir is not None) as stop:
        saver = None if out_dir is None else _Saver(out_dir, generator, device, stop, records, settings_digest,
                                                    parallel.world_size, carried_adam)
        parallel.preempt = stop
        ctx = _StageContext(model, dataset, config, generator, device, ckpt_dir, backend_name, parallel, saver,
                            len(plan), list(range(dataset.num_domains)))
        _train_stages(ctx, plan, records, in_stage, restored, carried_adam)
        scores = _score_test(ctx, out_dir)
    return _fit_result(ctx, records, scores, out_dir)


def check_device(device: str) -> torch.device:
    """``TrainConfig.device`` as a :class:`torch.device`, or ``ValueError`` naming it when this
    process cannot train there (no CUDA, or an index past the devices it has)."""
    dev = torch.device(device)  # TrainConfig checked the form
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r} (TrainConfig.device): no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r} (TrainConfig.device): this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def _prepare_model(model: CTRModel, backend: BackendLike, config: TrainConfig) -> str:
    """Set the backend, the fused embedding optimizer and the tables' precision on ``model``
    (the precision checked against the device first); return the backend's name for metrics.json."""
    backend_name = _set_backend(model, backend, check_device(config.device))
    check_precision(config.precision, config.device)  # ValueError naming the option, or a warning
    set_embedding_optimizer(model, _fused_embedding_optimizer(config))
    for collection in embedding_collections(model):  # half tables: TrainConfig checked the optimizer
        collection.set_precision(config.table_precision)
    return backend_name


def _open_run(
    out_dir: Path | None, model: CTRModel, dataset: Dataset, config: TrainConfig, backend: str, parallel: Parallel,
    resume: bool, resume_from: Path | None,
) -> tuple[dict[str, Any] | None, str | None]:
    """The resume snapshot the run continues from (``None``: it starts from the beginning) and
    the SHA-256 of its ``settings.json`` (``None`` without a run directory). The settings are
    recorded, or, resuming, checked with the snapshot (:func:`moefast.runs.snapshot.check_resumable`)."""
    snapshot: dict[str, Any] | None = None
    settings_digest: str | None = None
    world = parallel.world_size
    if out_dir is not None:
        _check_run_settings(out_dir, model, dataset, config, backend, resume, world)
        settings_digest = file_sha256(out_dir / SETTINGS)
        snapshot = load_snapshot(out_dir) if resume else None
        if resume:
            check_resumable(out_dir, snapshot, settings_digest)
    elif resume_from is not None:  # a data-parallel rank other than 0 (see fit)
        snapshot = load_snapshot(resume_from)
    if snapshot is not None and snapshot.get("world_size", world) != world and parallel.is_writer:
        # A valid continuation (the global batch is the same), but its sums are split otherwise.
        # stacklevel: the warning names fit's caller (_open_run, _fit, fit, the caller).
        warnings.warn(f"the resume snapshot was written by {snapshot['world_size']} process(es), this run has {world}: "
                      "the resumed run may not be bitwise equal to an uninterrupted one", stacklevel=4)
    return snapshot, settings_digest


@contextlib.contextmanager
def _checkpoint_dir(out_dir: Path | None, records: list[StageRecord]) -> Iterator[Path]:
    """Where the stages write their checkpoints: the run directory's, or (no run directory) a
    temporary folder, removed at the end; the records of ``records`` then name no checkpoint."""
    if out_dir is not None:
        yield out_dir / CHECKPOINTS
        return
    tmp = tempfile.TemporaryDirectory(prefix="moefast-")
    try:
        yield Path(tmp.name)
    finally:
        tmp.cleanup()
        for record in records:
            record.checkpoint = None


def _train_stages(
    ctx: _StageContext, plan: list[StageStep], records: list[StageRecord], in_stage: dict[str, Any] | None,
    restored: int, optimizer: torch.optim.Optimizer | None,
) -> None:
    """Train the stages of ``plan`` from ``len(records)`` on, appending each one's record to
    ``records`` (the resume snapshot's state ``in_stage`` continues the first of them;
    ``restored``: the finished stages a resume at a stage boundary found, -1 otherwise), the
    model ending as the last stage's checkpoint. ``optimizer``: the Adam carried across stages
    under ``seeds_compat``."""
    for index in range(len(records), len(plan)):
        step = plan[index]
        if records and (ctx.parallel.is_writer or index == restored):
            # Other ranks hold the same state in memory (only rank 0 writes checkpoints), except
            # right after a resume.
            _load_stage(ctx, records[-1])
        # seeds_compat: the best validation score so far is carried into the next stage.
        carried = records[-1].best_val_mean_auc if ctx.config.seeds_compat and records else -math.inf
        records.append(
            _run_stage(ctx, step, index, carried_best=-math.inf if math.isnan(carried) else carried,
                       resume=in_stage, optimizer=optimizer, base=records[-1] if records else None)
        )
        in_stage = None
        if ctx.saver is not None:
            ctx.saver.stage_done(records)
        if index + 1 < len(plan) and ctx.parallel.agree_to_stop():
            raise Preempted(_preempted_dir(ctx.saver, ctx.parallel), f"after stage {step.label}")
    if restored == len(plan):
        # Resuming a run whose training had finished: its model is the last checkpoint. (Not
        # after stages trained here: the model holds their end, and a data-parallel rank other
        # than 0 has no checkpoint of its own to reload.)
        _load_stage(ctx, records[-1])


def _load_stage(ctx: _StageContext, record: StageRecord) -> None:
    """Load the finished stage ``record``'s checkpoint into the model (strictly: its stage and dataset)."""
    assert record.checkpoint is not None
    load_checkpoint(record.checkpoint, ctx.model, expected_stage=record.label, dataset=ctx.dataset.name)


# The test split's logits, labels and domains, in the order of the predictions file, and whether
# that file is already written (a streamed run's, as the split is scored).
_TestScores = tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]


def _score_test(ctx: _StageContext, out_dir: Path | None) -> _TestScores:
    """Score the test split with the trained model (on every rank)."""
    # A streamed run's predictions file is written as the test split is scored (one process; a
    # data-parallel writer has the other ranks' rows only after the gather).
    write: Callable[[Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], None] | None = None
    if isinstance(ctx.dataset, StreamedDataset) and out_dir is not None and ctx.parallel.world_size == 1:
        write = functools.partial(write_scored_predictions, out_dir)
    logits, label, domain = _score(ctx.model, ctx.dataset, "test", None, ctx.config.eval_batch_size, ctx.device,
                                   ctx.parallel, write)
    if ctx.parallel.agree_to_stop():
        # SIGTERM after the last step boundary (in the test predictions): stop now rather than
        # forget it (a multi-method command would train its next method).
        raise Preempted(_preempted_dir(ctx.saver, ctx.parallel), "after training, before the outputs were written")
    return logits, label, domain, write is not None


def _fit_result(
    ctx: _StageContext, records: list[StageRecord], scores: _TestScores, out_dir: Path | None
) -> FitResult:
    """The fit's result from the test scores: the test metrics, the gate's weights and
    ``metrics.json``; the run's outputs written (rank 0)."""
    model, dataset, parallel = ctx.model, ctx.dataset, ctx.parallel
    test_logits, test_label, test_domain, written = scores
    _refuse_non_finite_scores(test_logits, "test")
    test = parallel.once(lambda: evaluate_scores(
        test_logits, test_label, test_domain, dataset.domain_names))
    gate = None
    if model.tower.gate is not None:
        with torch.no_grad():
            gate = model.tower.gate_weights(torch.arange(dataset.num_domains, device=ctx.device)).cpu()
    result = FitResult(_metrics(ctx, records, test), test, records, test_logits, gate, out_dir, test_label,
                       test_domain, predictions_written=written)
    if out_dir is not None and parallel.is_writer:
        write_run(out_dir, result, dataset)
    return result


def _metrics(ctx: _StageContext, records: list[StageRecord], test: EvalMetrics) -> dict[str, Any]:
    """``metrics.json`` (DESIGN.md section 5)."""
    config, parallel = ctx.config, ctx.parallel
    train_samples = sum(r.train_samples for r in records)
    train_seconds = sum(r.train_seconds for r in records)
    metrics: dict[str, Any] = {
        "dataset": ctx.dataset.name,
        "model": ctx.model.name,
        "method": method_name(ctx.model),
        "backend": ctx.backend,
        "device": str(ctx.device),
        "seed": config.seed,
        "table_precision": config.table_precision.value,
        "precision": config.precision.value,
        "test": test.to_dict(),
        "stages": [r.to_dict() for r in records],
        "train_samples_per_second": train_samples / train_seconds if train_seconds > 0 else 0.0,
    }
    if isinstance(parallel, distributed.DataParallel):
        metrics["distributed"] = {"world_size": parallel.world_size,
                                  "bytes_per_step": parallel.traffic.per_step()}
    return metrics


@dataclass(frozen=True)
class StageBudget:
    """When a stage validates and when it must end (:class:`TrainConfig`'s budget for one
    stage): every ``eval_every`` steps (``None``: at every epoch's end), at most ``max_steps``
    steps and ``max_epochs`` epochs (``None``: no cap of that kind)."""

    eval_every: int | None
    max_steps: int | None
    max_epochs: int | None

    @classmethod
    def of(cls, config: TrainConfig, step: StageStep) -> StageBudget:
        max_epochs = config.max_epochs
        if step.stage is Stage.EXPERT:
            max_epochs = config.expert_max_epochs or max_epochs
        elif step.stage is Stage.GATE:
            max_epochs = config.gate_max_epochs or max_epochs
        # The seeds validate after every epoch, with patience counted in epochs.
        return cls(None if config.seeds_compat else config.eval_every, config.max_steps, max_epochs)


@dataclass(frozen=True)
class _StageContext:
    """What every stage of one ``fit`` shares: the model, the data, the options and the
    run's machinery. ``total``: the plan's stage count (for the progress lines); ``saver``:
    ``None`` without a run directory (or on a data-parallel rank other than 0)."""

    model: CTRModel
    dataset: Dataset
    config: TrainConfig
    generator: torch.Generator  # batch and domain order, drawn on across stages
    device: torch.device
    ckpt_dir: Path
    backend: str
    parallel: Parallel
    saver: _Saver | None
    total: int
    all_domains: list[int]


def _run_stage(
    ctx: _StageContext,
    step: StageStep,
    index: int,
    *,
    carried_best: float = -math.inf,
    resume: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    base: StageRecord | None = None,
) -> StageRecord:
    """Train stage ``index`` of the plan (from its start, or from the snapshot state ``resume``)
    and write its checkpoint; ``ctx.saver`` writes the resume snapshot after every validation,
    and at the step where ``SIGTERM`` stops the run (then :class:`Preempted` is raised).
    ``optimizer``: the Adam carried from stage to stage under ``seeds_compat`` (``None``: a
    fresh one over the stage's parameters). ``base``: the previous stage, whose checkpoint the
    model was loaded from; this stage's checkpoint then stores only what it changed and refers to
    that one (``None``: the first stage, a full checkpoint)."""
    return _StageRun(ctx, step, index, carried_best=carried_best, resume=resume, optimizer=optimizer).run(base)


class _StageRun:
    """One stage as it trains (:func:`_run_stage`): its parameters and optimizer, budget, loader
    and :class:`StageState`, and where the current epoch stands. Built, it has set the stage
    and restored the resume state; :meth:`run` trains it to its end."""

    def __init__(
        self, ctx: _StageContext, step: StageStep, index: int, *, carried_best: float,
        resume: dict[str, Any] | None, optimizer: torch.optim.Optimizer | None,
    ) -> None:
        self.start = time.perf_counter()  # less the seconds before a resume (below)
        self.ctx, self.step, self.index = ctx, step, index
        config, model = ctx.config, ctx.model
        compat = config.seeds_compat
        self.params = set_stage(model, step, train_backbone=config.train_backbone_in_later_stages or compat,
                                freeze_pretrained=config.pretrained is PretrainedMode.FROZEN,
                                seeds_as_run=compat, seeds_gate=config.seeds_gate)
        apply_frozen_path_dropout(model, config.frozen_path_dropout)
        self.optimizer = optimizer if optimizer is not None else _dense_optimizer(model, self.params, config, ctx.backend)
        self.budget = StageBudget.of(config, step)
        train_domains, self.val_domains, self.by_loss = _stage_domains(ctx, step)
        self.st = self._state(resume, carried_best)
        self.start -= self.st.elapsed
        self.loader = _train_loader(ctx, train_domains)
        self.saved_at = -math.inf  # time.monotonic() of this stage's last snapshot
        # A snapshot taken after the stage's end resumes straight into it (snapshots written before
        # stopped_by was recorded: the epoch rule, the only one there was).
        st, budget = self.st, self.budget
        self.resumed_after_end = st.stopped_by is not None or (
            st.skip == 0 and resume is not None and "stopped_by" not in resume and (
                st.stopper.should_stop or (budget.max_epochs is not None and st.epochs >= budget.max_epochs)))
        self.epoch = 0  # the epoch being trained, from 1
        self.epoch_generator: torch.Tensor | None = None  # the batch-order generator before the epoch drew its order
        self.validated_at = -1  # the step of this epoch's last validation

    def _state(self, resume: dict[str, Any] | None, carried_best: float) -> StageState:
        """The stage's state at its start, or restored from the snapshot state ``resume``."""
        config, model = self.ctx.config, self.ctx.model
        if resume is None:
            return StageState.fresh(config.patience, self.params, carried_best)
        check_stage_state(resume, model, self.optimizer, self.params)  # before anything is written
        st = StageState.restore(resume, model, self.optimizer, self.params, config.patience, self.ctx.device)
        if st.skip:
            self.ctx.generator.set_state(resume["epoch_generator"])  # the epoch draws its order again
        return st

    def run(self, base: StageRecord | None) -> StageRecord:
        """Train epochs until the stage ends; then its best weights, checkpoint and record
        (:func:`_finish_stage`; ``base`` as :func:`_run_stage` takes it)."""
        ctx, st = self.ctx, self.st
        runner = ctx.parallel.wrap(ctx.model)  # under data parallelism, a fresh DDP wrapper for each stage
        while not self.resumed_after_end and st.stopped_by is None:
            self.run_epoch(runner)
        ctx.parallel.unwrap(ctx.model)
        if st.stopped_by == "cap" and ctx.parallel.is_writer:
            # stacklevel: the warning names _run_stage's caller (run, _run_stage, the caller).
            warnings.warn(f"stage {self.step.label} ended at its cap ({_cap_text(self.budget)}) while still improving "
                          f"within its patience of {ctx.config.patience} validations: it did not converge",
                          CapWarning, stacklevel=3)
        return _finish_stage(ctx, self.step, self.index, st, self.params, base, self.start)

    def run_epoch(self, runner: torch.nn.Module) -> None:
        """Train one epoch (after a resume, the rest of it), validate and snapshot as the budget
        says; :class:`Preempted` when ``SIGTERM`` asked the run to stop."""
        ctx, st = self.ctx, self.st
        self.epoch = st.epochs + 1
        self.epoch_generator = ctx.generator.get_state()  # before the epoch draws its order
        self.validated_at = -1
        desc = f"[{self.index + 1}/{ctx.total}] {self.step.label} epoch {self.epoch}"
        t0 = time.perf_counter()
        try:
            trained, drawn = _train_epoch(
                ctx.model, self.loader, self.step, self.optimizer, ctx.config, ctx.device, desc=desc,
                losses=st.losses, parallel=ctx.parallel, runner=runner, skip=st.skip, after_step=self.after_step,
            )
            st.samples += trained
        except _Stopped as stopped:
            st.samples += stopped.samples
            st.train_seconds += time.perf_counter() - t0
            self.snapshot(stopped.batches, self.epoch_generator)
            raise Preempted(_preempted_dir(ctx.saver, ctx.parallel), f"at {desc}, batch {stopped.batches}") from None
        st.skip = 0
        st.train_seconds += time.perf_counter() - t0
        st.epochs = self.epoch
        self.end_epoch(drawn)
        stop = ctx.parallel.agree_to_stop()
        # A snapshot follows each validation and the stage's end; at an epoch's end otherwise only
        # every SNAPSHOT_SECONDS (an expert's epoch may be one step: a snapshot each would cost
        # more than the step). A resume replays the steps since the last one, bitwise.
        if (st.stopped_by is not None or stop or self.validated_at == len(st.losses)
                or time.monotonic() - self.saved_at >= SNAPSHOT_SECONDS):
            self.snapshot(0, None)
        if stop:
            raise Preempted(_preempted_dir(ctx.saver, ctx.parallel), f"after {desc}")

    def after_step(self, batches: int, epoch_samples: int) -> str | None:
        """:func:`_train_epoch`'s ``after_step``: validate every ``eval_every`` steps, end the
        stage at the step cap, snapshot after a validation; ``"end"`` once the stage is over,
        ``"preempt"`` once ``SIGTERM`` asked the job to stop."""
        fault_step(self.index, self.epoch, batches)
        st, budget = self.st, self.budget
        steps = len(st.losses)
        if budget.eval_every is not None and steps % budget.eval_every == 0:
            self.validate()
        if st.stopped_by is None and budget.max_steps is not None and steps >= budget.max_steps:
            self.end_at_cap()
        if st.stopped_by is not None:
            return "end"
        if self.validated_at == steps:
            assert self.epoch_generator is not None
            self.snapshot(batches, self.epoch_generator, epoch_samples)
        # Under data parallelism decided in the step's all-reduce, the same on every rank.
        return "preempt" if self.ctx.parallel.stop_agreed else None

    def end_epoch(self, drawn: int) -> None:
        """After the epoch's last step (``drawn`` batches drawn): the per-epoch validation, or
        (step budget) one after an epoch that trained no step at all; the epoch cap."""
        st, budget = self.st, self.budget
        if st.stopped_by is not None:
            return
        if budget.eval_every is None or (self.validated_at < 0 and not drawn):
            self.validate()
        if st.stopped_by is None and budget.max_epochs is not None and st.epochs >= budget.max_epochs:
            self.end_at_cap()

    def end_at_cap(self) -> None:
        """A cap ends the stage: validated at this step (unless just done), it ended by patience
        if that ran out, else by the cap."""
        st = self.st
        if self.validated_at != len(st.losses):
            self.validate()
        st.stopped_by = "patience" if st.stopper.should_stop else "cap"

    def validate(self) -> None:
        """Score the validation rows and update early stopping (the best weights; under
        seeds_compat, back to them when no better); the stage ends once patience runs out."""
        ctx, st = self.ctx, self.st
        self.validated_at = len(st.losses)
        where = f"[{self.index + 1}/{ctx.total}] {self.step.label} epoch {self.epoch}, step {len(st.losses)}"
        # Only the rows that decide early stopping are evaluated (one domain for an expert).
        val_only = None if self.val_domains == ctx.all_domains else self.val_domains
        val_logits, val_label, val_domain = _score(ctx.model, ctx.dataset, "val", val_only, ctx.config.eval_batch_size,
                                                   ctx.device, ctx.parallel)
        _refuse_non_finite_scores(val_logits, f"{where}: validation")
        val = ctx.parallel.once(functools.partial(
            evaluate_scores, val_logits, val_label, val_domain, ctx.dataset.domain_names, domains=self.val_domains,
        ))
        st.history.append(val.mean_auc)
        st.loss_history.append(val.logloss)
        if ctx.config.progress:
            say(f"{where}: {self._val_text(val)}")
        if st.stopper.update(-val.logloss if self.by_loss else val.mean_auc):
            st.best_state = {id(p): p.detach().clone() for p in self.params}
            st.best.auc, st.best.step, st.best.epoch = val.mean_auc, len(st.losses), self.epoch
        elif ctx.config.seeds_compat and st.best_state is not None:
            # seeds_compat: training goes on from the best checkpoint (the seeds reload it).
            st.load_best(self.params)
        if st.stopper.should_stop:
            st.stopped_by = "patience"

    def _val_text(self, val: EvalMetrics) -> str:
        """What the progress line says of a validation: the score that decides early stopping."""
        own = self.ctx.dataset.domain_names[self.val_domains[0]]
        if self.by_loss:
            return f"val logloss of {own} {val.logloss:.5f} (AUC {val.mean_auc:.5f})"
        what = "val mean AUC" if len(self.val_domains) > 1 else f"val AUC of {own}"
        return f"{what} {val.mean_auc:.5f}"

    def snapshot(self, batches: int, epoch_generator: torch.Tensor | None, epoch_samples: int = 0) -> None:
        """Write the resume snapshot (rank 0) at ``batches`` batches into the epoch (0: at its
        end); ``epoch_samples``: the epoch's rows trained so far."""
        self.saved_at = time.monotonic()
        if self.ctx.saver is not None:
            self.ctx.saver.in_stage(self.st.snapshot(
                self.index, self.step.label, batches, epoch_generator, self.ctx.model, self.optimizer, self.params,
                time.perf_counter() - self.start, epoch_samples))


def _stage_domains(ctx: _StageContext, step: StageStep) -> tuple[list[int], list[int], bool]:
    """The domains stage ``step`` trains on, those whose validation decides its early stopping,
    and whether that is the own domain's logloss (else the mean AUC)."""
    config, all_domains = ctx.config, ctx.all_domains
    if step.stage is not Stage.EXPERT:
        return all_domains, all_domains, False
    assert step.expert is not None
    own = ctx.model.tower.expert_domain(step.expert)
    if config.expert_stop is ExpertStopRule.ALL_DOMAINS or config.seeds_compat:
        return [own], all_domains, False
    return [own], [own], config.expert_stop is ExpertStopRule.OWN_DOMAIN_LOSS


def _train_loader(ctx: _StageContext, domains: list[int]) -> BatchLoader | StreamLoader:
    """The stage's training batches: of ``domains`` (``ctx.all_domains``: every domain), in the
    order ``ctx.generator`` draws."""
    config, dataset, parallel = ctx.config, ctx.dataset, ctx.parallel
    if isinstance(dataset, StreamedDataset):
        return streamed.train_loader(dataset, config.batch_size, _ORDER[config.batches],
                                     None if domains == ctx.all_domains else domains, ctx.generator,
                                     parallel.rank, parallel.world_size)
    return BatchLoader(dataset.train, config.batch_size, _ORDER[config.batches], domains=domains,
                       generator=ctx.generator)


def _finish_stage(
    ctx: _StageContext, step: StageStep, index: int, st: StageState, params: list[torch.nn.Parameter],
    base: StageRecord | None, start: float,
) -> StageRecord:
    """The end of a stage: its best weights back in the model, its checkpoint written (rank 0)
    and its record; ``start``: the stage's ``time.perf_counter()`` at its start."""
    model, parallel, dataset = ctx.model, ctx.parallel, ctx.dataset
    # With no AUC at all (every validation domain one-class) nothing improves: keep the last
    # weights rather than the untrained ones.
    if st.best_state is not None:
        st.load_best(params)
    path = ctx.ckpt_dir / f"{index:02d}_{step.label}.pt"
    digest = None
    best_auc = st.best.auc if st.stopper.best > -math.inf else math.nan
    if parallel.is_writer:
        save_checkpoint(
            path, model, step.label,
            {"model": model.name, "tower": model.tower.kind.value, "dataset": dataset.name, "index": index,
             "best_val_mean_auc": None if math.isnan(best_auc) else best_auc},
            # A later stage stores what it trained; the previous stage's checkpoint holds the rest.
            base=None if base is None else base.checkpoint, base_sha256=None if base is None else base.checkpoint_sha256,
            keys=None if base is None else stage_state_keys(model, params),
        )
        digest = file_sha256(path)
    return StageRecord(
        label=step.label,
        epochs=st.epochs,
        best_val_mean_auc=best_auc,
        seconds=time.perf_counter() - start,
        train_samples=st.samples,
        train_seconds=st.train_seconds,
        val_history=st.history,
        checkpoint=path,
        losses=st.losses,
        checkpoint_sha256=digest,
        best_epoch=st.best.epoch,
        best_step=st.best.step,
        stopped_by=st.stopped_by,
        val_loss_history=st.loss_history,
    )


@dataclass
class StageState:
    """Where a stage stands: early stopping, its best weights and where they were, the
    histories, the counters and what ended it (``None`` while it runs); everything the stage's
    resume snapshot holds besides the model and the optimizer. ``skip``: batches of the current
    epoch trained before a resume; ``elapsed``: seconds spent before it."""

    stopper: EarlyStopping
    best: _Best
    best_state: dict[int, torch.Tensor] | None = None
    history: list[float] = field(default_factory=list)
    loss_history: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    samples: int = 0
    train_seconds: float = 0.0
    epochs: int = 0
    stopped_by: str | None = None
    skip: int = 0
    elapsed: float = 0.0

    @classmethod
    def fresh(cls, patience: int, params: list[torch.nn.Parameter], carried_best: float) -> StageState:
        """A stage from its start; under seeds_compat (``carried_best`` finite) it starts from
        the best checkpoint so far and must beat its score."""
        stopper = EarlyStopping(patience)
        if carried_best == -math.inf:
            return cls(stopper, _Best())
        stopper.best = carried_best
        return cls(stopper, _Best(auc=carried_best), best_state={id(p): p.detach().clone() for p in params})

    @classmethod
    def restore(cls, saved: Mapping[str, Any], model: CTRModel, optimizer: torch.optim.Optimizer,
                params: list[torch.nn.Parameter], patience: int, device: torch.device) -> StageState:
        """The state a snapshot holds (checked by :func:`check_stage_state` first), loaded into
        ``model`` (buffers included: the fused optimizers' state) and ``optimizer``."""
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        stopper = EarlyStopping(patience)
        stopper.best, stopper.stale = float(saved["stopper"]["best"]), int(saved["stopper"]["stale"])
        best_state = None if saved["best_state"] is None else {
            id(p): t.to(device) for p, t in zip(params, saved["best_state"], strict=True)}
        return cls(
            stopper, _Best.from_state(saved["stopper"]), best_state, list(saved["history"]),
            list(saved.get("loss_history", [])), list(saved["losses"]), int(saved["samples"]),
            float(saved["train_seconds"]), int(saved["epochs"]), saved.get("stopped_by"), int(saved["batches"]),
            float(saved["seconds"]),
        )

    def snapshot(self, index: int, label: str, batches: int, epoch_generator: torch.Tensor | None, model: CTRModel,
                 optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], seconds: float,
                 epoch_samples: int = 0) -> dict[str, Any]:
        """The in-stage entry of the resume snapshot (``moefast.runs.snapshot.STAGE_STATE``);
        ``epoch_samples``: rows of the current epoch not yet in ``samples`` (a snapshot taken
        inside an epoch, after a validation)."""
        return {
            "index": index, "label": label, "epochs": self.epochs, "batches": batches,
            "epoch_generator": epoch_generator, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "stopper": {"best": self.stopper.best, "stale": self.stopper.stale, **self.best.state()},
            "best_state": None if self.best_state is None else [self.best_state[id(p)] for p in params],
            "history": self.history, "loss_history": self.loss_history, "losses": self.losses,
            "samples": self.samples + epoch_samples, "train_seconds": self.train_seconds, "seconds": seconds,
            "stopped_by": self.stopped_by,
        }

    def load_best(self, params: list[torch.nn.Parameter]) -> None:
        assert self.best_state is not None
        with torch.no_grad():
            for p in params:
                p.copy_(self.best_state[id(p)])


def _cap_text(budget: StageBudget) -> str:
    caps = [f"{budget.max_steps} steps" if budget.max_steps is not None else "",
            f"{budget.max_epochs} epochs" if budget.max_epochs is not None else ""]
    return " or ".join(c for c in caps if c)


@dataclass
class _Best:
    """Where a stage's best validation was: its AUC (the loss rule's best is a loss, so the AUC
    is kept beside it), step and epoch (``None`` before any improvement)."""

    auc: float = math.nan
    step: int | None = None
    epoch: int | None = None

    def state(self) -> dict[str, Any]:
        return {"best_auc": self.auc, "best_step": self.step, "best_epoch": self.epoch}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Best:
        """From a snapshot's stopper state (written before these were recorded: the AUC was the
        stopping score, the step and epoch unknown)."""
        if "best_auc" not in state:
            return cls(auc=float(state["best"]) if state["best"] > -math.inf else math.nan)
        step, epoch = state.get("best_step"), state.get("best_epoch")
        return cls(auc=float(state["best_auc"]), step=None if step is None else int(step),
                   epoch=None if epoch is None else int(epoch))


def _preempted_dir(saver: _Saver | None, parallel: Parallel) -> Path:
    """The run directory a :class:`Preempted` names: rank 0's, or the job's on another rank
    (which writes nothing)."""
    if saver is not None:
        return saver.run_dir
    assert parallel.run_dir is not None  # preemption is enabled only then
    return parallel.run_dir


class _Saver:
    """Writes the run's resume snapshot (:mod:`moefast.runs.snapshot`): in a stage, or after one."""

    def __init__(
        self, run_dir: Path, generator: torch.Generator, device: torch.device, stop: Any, records: list[StageRecord],
        settings_digest: str | None, world_size: int, carried: torch.optim.Optimizer | None = None,
    ) -> None:
        self.carried = carried  # the Adam carried across stages under seeds_compat
        self.run_dir = run_dir
        self.settings_digest = settings_digest  # binds each snapshot to this run's settings.json
        self.world_size = world_size
        self.generator = generator
        self.device = device
        self.stop = stop  # true once SIGTERM asked the run to stop
        self.records = list(records)  # the finished stages (restored ones included)

    def _save(self, payload: dict[str, Any]) -> None:
        # save_snapshot adds the registered parts' states (moefast.runs.snapshot.register_snapshot_part).
        save_snapshot(self.run_dir, payload)

    def _payload(self, stage: dict[str, Any] | None) -> dict[str, Any]:
        return {"records": [_record_state(r) for r in self.records], "rng": rng_state(self.generator, self.device),
                "stage": stage, "settings_sha256": self.settings_digest, "world_size": self.world_size}

    def in_stage(self, stage: dict[str, Any]) -> None:
        self._save(self._payload(stage))

    def stage_done(self, records: list[StageRecord]) -> None:
        self.records = list(records)
        snapshot = self._payload(None)
        if self.carried is not None:
            snapshot["carried_optimizer"] = self.carried.state_dict()
        self._save(snapshot)


def _carried_optimizer(
    model: CTRModel, plan: list[StageStep], config: TrainConfig, backend: str, snapshot: Mapping[str, Any] | None
) -> torch.optim.Optimizer | None:
    """Under ``seeds_compat``, the one Adam that every stage steps (the seeds compile their
    model once, so its optimizer state carries from stage to stage), restored from a snapshot
    taken at a stage boundary; ``None`` otherwise (each stage gets a fresh Adam)."""
    if not config.seeds_compat:
        return None
    # The last stage trains the most (under SeedsGate.GATE_STAGE also the gate's linear part;
    # Adam leaves a parameter without a gradient untouched in the stages that freeze it).
    params = set_stage(model, plan[-1], train_backbone=True, freeze_pretrained=config.pretrained is PretrainedMode.FROZEN,
                       seeds_as_run=True, seeds_gate=config.seeds_gate)
    optimizer = _dense_optimizer(model, params, config, backend)
    saved = None if snapshot is None else snapshot.get("carried_optimizer")
    if snapshot is not None and snapshot.get("records") and saved is None:
        raise ValueError("the resume snapshot of a seeds_compat run lacks the optimizer state carried across stages")
    if saved is not None:
        check_adam_state(saved, optimizer, lambda what: ValueError(
            f"the resume snapshot's carried optimizer state does not fit this run: {what}"))
        optimizer.load_state_dict(saved)
    return optimizer


def _record_state(record: StageRecord) -> dict[str, Any]:
    state = {f: getattr(record, f) for f in ("label", "epochs", "best_val_mean_auc", "seconds",
                                              "train_samples", "train_seconds", "val_history", "losses",
                                              "checkpoint_sha256", "best_epoch", "best_step", "stopped_by",
                                              "val_loss_history")}
    state["checkpoint"] = None if record.checkpoint is None else record.checkpoint.name
    return state


def _record_from_state(ckpt_dir: Path, state: dict[str, Any]) -> StageRecord:
    """A finished stage's record from its snapshot entry (:func:`_record_state`), its checkpoint in ``ckpt_dir``."""
    return StageRecord(**{**state, "checkpoint": ckpt_dir / state["checkpoint"]})


def _check_run_settings(
    out_dir: Path, model: CTRModel, dataset: Dataset, config: TrainConfig, backend: str, resume: bool, world: int
) -> None:
    """Record what the run's continuation must share with it (``settings.json``), or, resuming,
    refuse a model, data, configuration or backend that differ, naming the keys."""
    settings = settings_record(
        config, backend,
        dataset=dataset_settings(dataset, None if not isinstance(dataset, StreamedDataset)
                                 else streamed.shards_of(dataset, world)),
        model={"name": model.name, "tower": model.tower_config, "initial_state": state_fingerprint(model)},
    )
    path = out_dir / SETTINGS
    if not resume:
        path.unlink(missing_ok=True)
    elif not path.exists() and (out_dir / SNAPSHOT).exists():
        # Written before the first snapshot: without it nothing tells this run's options, model
        # and data from the first run's, and a resume with other ones would go unnoticed.
        raise ValueError(
            f"run directory {str(out_dir)!r} holds a resume snapshot but no {SETTINGS} (deleted?): what the "
            "run was started with cannot be checked; start it again with --overwrite"
        )
    check_settings(path, settings, lambda keys: (
        f"run directory {str(out_dir)!r} was started with other settings ({', '.join(keys)}; recorded in "
        f"{str(path)!r}): resume it with the same data, model and options, or start again with --overwrite"))


def _score(
    model: CTRModel,
    dataset: Dataset,
    split_name: str,
    domains: list[int] | None,
    batch_size: int,
    device: torch.device,
    parallel: Parallel,
    write: Callable[[Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, labels, domains)`` of the split ``split_name``'s rows of ``domains`` (None:
    all), on every rank: a streamed split read in stored order (:func:`moefast.train.streamed.score`),
    an in-memory one in row order (:func:`_predict_rows`). ``write``: a streamed split's
    scores as they are computed (:func:`moefast.train.streamed.score`)."""
    if isinstance(dataset, StreamedDataset):
        return streamed.score(model, getattr(dataset, split_name), domains, batch_size, device, parallel, write)
    split: Split = getattr(dataset, split_name)
    if domains is None:
        return _predict_rows(model, split, None, batch_size, device, parallel), split.label, split.domain
    rows = torch.nonzero(torch.isin(split.domain, torch.tensor(domains))).squeeze(1)
    return _predict_rows(model, split, rows, batch_size, device, parallel), split.label[rows], split.domain[rows]


def _predict_rows(
    model: CTRModel,
    split: Split,
    rows: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
    parallel: Parallel,
) -> torch.Tensor:
    """:func:`predict` of ``rows`` (default: every row), each rank scoring its shard and the
    logits gathered in row order on every rank (one process: all of them, here)."""
    index = torch.arange(len(split)) if rows is None else rows
    mine = predict(model, split, rows=parallel.shard(index), batch_size=batch_size, device=device)
    return parallel.gather_rows(mine)

