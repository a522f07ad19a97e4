"""Moved to :mod:`moefast.runs.writer` (issue 25, one room per concern). This name stays an alias of that
module until the end of wave 3: ``import moefast.train.atomic`` gives the same module object."""

import sys

import moefast.runs.writer as _moved
from moefast.runs.writer import *  # noqa: F403  (the public names, for static checkers)

sys.modules[__name__] = _moved
