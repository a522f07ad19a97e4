"""Where a training step applies ``TrainConfig.precision`` (one place, for every step form)."""

from __future__ import annotations

import contextlib

from moefast import precision as _precision
from moefast.config import Precision

__all__ = ["step_precision"]


def step_precision(precision: Precision) -> contextlib.AbstractContextManager[None]:
    """The block a training step runs its forward in: :func:`moefast.precision.autocast`.

    Both the single-process step (:func:`moefast.train.loop.train_step`) and the data-parallel
    one (:meth:`moefast.train.parallel.data_parallel.DataParallel.train_step`) call this and nothing else
    about precision. The layers' autograd nodes keep what their backward needs (bf16 operands),
    so backward runs outside the block; the loss, the optimizer step and the master weights
    stay float32 (:mod:`moefast.precision`). Evaluation runs in float32.
    """
    return _precision.autocast(precision)
