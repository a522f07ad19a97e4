"""Moved to :mod:`moefast.experiments.claims` (issue 25, one room per concern). This name stays an alias of that
module until the end of wave 3: ``import moefast.train.claims`` gives the same module object."""

import sys

import moefast.experiments.claims as _moved
from moefast.experiments.claims import *  # noqa: F403  (the public names, for static checkers)

sys.modules[__name__] = _moved
