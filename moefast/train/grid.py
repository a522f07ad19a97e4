"""Moved to :mod:`moefast.experiments.grid` (issue 25, one room per concern). This name stays an alias of that
module until the end of wave 3: ``import moefast.train.grid`` gives the same module object."""

import sys

import moefast.experiments.grid as _moved
from moefast.experiments.grid import *  # noqa: F403  (the public names, for static checkers)

sys.modules[__name__] = _moved
