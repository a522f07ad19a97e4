"""moefast.train: stages, the training loop, metrics, checkpoints and the run directory."""

from __future__ import annotations

from moefast.runs.checkpoint import load_checkpoint, save_checkpoint
from moefast.train.loop import (
    FitResult,
    StageRecord,
    embedding_collections,
    fit,
    predict,
    set_embedding_optimizer,
    stage_optimizer,
    train_step,
)
from moefast.train.metrics import EvalMetrics, auc, evaluate_scores, logloss
from moefast.train.stages import Stage, StageStep, mask_gradients, plan_stages, set_stage

__all__ = [
    "EvalMetrics",
    "FitResult",
    "Stage",
    "StageRecord",
    "StageStep",
    "auc",
    "embedding_collections",
    "evaluate_scores",
    "fit",
    "load_checkpoint",
    "logloss",
    "mask_gradients",
    "plan_stages",
    "predict",
    "save_checkpoint",
    "set_embedding_optimizer",
    "set_stage",
    "stage_optimizer",
    "train_step",
]
