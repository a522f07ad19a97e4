"""Moved to :mod:`moefast.runs.rundir` (issue 25, one room per concern). This name stays an alias of that
module until the end of wave 3: ``import moefast.train.rundir`` gives the same module object."""

import sys

import moefast.runs.rundir as _moved
from moefast.runs.rundir import *  # noqa: F403  (the public names, for static checkers)

sys.modules[__name__] = _moved
