"""Experiments on top of training: the default three-method experiment (:func:`run_methods`, from
:mod:`moefast.experiments.methods`), the grid (:mod:`moefast.experiments.grid`) and the claims
report (:mod:`moefast.experiments.claims`).

Owns: plans of many runs, their shared tables and reports, and their statistics. Imports
:mod:`moefast.train`, :mod:`moefast.runs` and the data sources; nothing below imports it (only
the command line does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moefast.experiments.methods import run_methods

__all__ = ["run_methods"]

# The default three-method experiment, the one the command line runs. Imported on first use so
# that ``moefast.experiments.stats`` and the claims do not pull in the training loop.
_LAZY = {"run_methods": "moefast.experiments.methods"}


def __getattr__(name: str) -> object:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
