"""Moved to :mod:`moefast.runs.checkpoint` (issue 25, one room per concern). This name stays an alias of that
module until the end of wave 3: ``import moefast.train.checkpoint`` gives the same module object."""

import sys

import moefast.runs.checkpoint as _moved
from moefast.runs.checkpoint import *  # noqa: F403  (the public names, for static checkers)

sys.modules[__name__] = _moved
