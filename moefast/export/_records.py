"""Moved to :mod:`moefast.runs.records` (issue 25: a run directory's files live in ``runs``); this
re-export stays until the end of the wave."""

from moefast.runs.records import *  # noqa: F403
from moefast.runs.records import __all__  # noqa: F401
