"""Moved to :mod:`moefast.runs.read` (issue 25: reading a run back lives in ``runs``); this
re-export stays until the end of the wave."""

from moefast.runs.read import *  # noqa: F403
from moefast.runs.read import __all__  # noqa: F401
