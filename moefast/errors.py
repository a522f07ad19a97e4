"""Every exception and warning ``moefast`` raises to its users, in one place.

Each class is the very object raised where it is raised today (``from moefast.errors import
NonFiniteError`` catches what ``moefast.train.fit`` raises): this module re-exports them by
identity, and defines only :class:`UserError`, the command line's one-line mistake.

Owns: the public exception list. Never imports the command line or the experiments (a class
raised there is defined here).
"""

from __future__ import annotations

from moefast._ext import TowerOpWarning
from moefast.data._raw import RawFormatError
from moefast.data.cache import CacheEntryError
from moefast.data.table import TableError
from moefast.ops._backend import BackendUnavailableError
from moefast.precision import PrecisionWarning
from moefast.runs.rundir import RunDirectoryError
from moefast.runs.snapshot import Preempted
from moefast.runs.writer import WriteError
from moefast.train.errors import CapWarning, NonFiniteError
from moefast.train.parallel.data_parallel import RankFailedError

__all__ = [
    "BackendUnavailableError",
    "CacheEntryError",
    "CapWarning",
    "NonFiniteError",
    "PrecisionWarning",
    "Preempted",
    "RankFailedError",
    "RawFormatError",
    "RunDirectoryError",
    "TableError",
    "TowerOpWarning",
    "UserError",
    "WriteError",
]


class UserError(Exception):
    """A mistake in the command line or the config file: reported as one line."""
