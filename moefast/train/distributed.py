"""Moved to :mod:`moefast.train.parallel.data_parallel` (issue 25, one room per concern). This name stays an alias of that
module until the end of wave 3: ``import moefast.train.distributed`` gives the same module object."""

import sys

import moefast.train.parallel.data_parallel as _moved
from moefast.train.parallel.data_parallel import *  # noqa: F403  (the public names, for static checkers)

sys.modules[__name__] = _moved
