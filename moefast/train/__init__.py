"""moefast.train: fitting one model: ``fit``, ``predict``, the stages and the metrics.

The step plumbing (optimizers, the training step, gradient masks) lives in its own modules:
:mod:`moefast.train.loop` and :mod:`moefast.train.stages`. Its names, once exported here, still
import from here for this wave, with a :class:`DeprecationWarning` naming their home. The
exceptions ``fit`` raises are in :mod:`moefast.errors`.

Owns: fitting one model (the stage loop, the stages, one loss and step, metrics); data
parallelism in :mod:`moefast.train.parallel`. Never imports: :mod:`moefast.experiments` or the
command line (the aliases left at the old paths, ``moefast.train.grid`` and the like, until the
end of wave 3, are not training's own imports). What a run leaves on disk is
:mod:`moefast.runs`'.
"""

from __future__ import annotations

import importlib
import warnings

from moefast.runs.checkpoint import load_checkpoint, save_checkpoint
from moefast.train.errors import CapWarning, NonFiniteError
from moefast.train.loop import FitResult, StageRecord, fit, predict
from moefast.train.metrics import EvalMetrics, auc, evaluate_scores, logloss
from moefast.train.stages import Stage, StageStep, plan_stages, set_stage

__all__ = [
    "CapWarning",
    "EvalMetrics",
    "FitResult",
    "NonFiniteError",
    "Stage",
    "StageRecord",
    "StageStep",
    "auc",
    "evaluate_scores",
    "fit",
    "load_checkpoint",
    "logloss",
    "plan_stages",
    "predict",
    "save_checkpoint",
    "set_stage",
]

# Names that left ``__all__`` (issue 25, wave 3): each one's home, where it imports from silently.
MOVED = {
    "embedding_collections": "moefast.train.loop",
    "mask_gradients": "moefast.train.stages",
    "set_embedding_optimizer": "moefast.train.loop",
    "stage_optimizer": "moefast.train.loop",
    "train_step": "moefast.train.loop",
}


def __getattr__(name: str) -> object:
    home = MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"moefast.train.{name} moved to {home}.{name}; import it from there (the old name goes "
                  "at the end of this wave)", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)
