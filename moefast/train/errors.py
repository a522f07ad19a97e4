"""Errors the training loop and the data-parallel step share (a module of its own, so that
:mod:`moefast.train.parallel.data_parallel` need not import the loop that imports it)."""

from __future__ import annotations

__all__ = ["CapWarning", "NonFiniteError"]


class NonFiniteError(ValueError):
    """A training loss or a model score is NaN or infinite: the stage stops here, before the
    value reaches an optimizer step, an AUC or early stopping (a ``ValueError``, so the command
    line reports it as one line)."""


class CapWarning(UserWarning):
    """A stage ended at its cap (``max_steps`` / ``max_epochs``) while early stopping would have
    gone on: it did not converge. ``moefast`` prints it as one ``moefast: warning:`` line."""
