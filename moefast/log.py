"""What a run tells its user: one channel (the ``moefast`` logger) and one quiet switch.

Messages (a run's progress lines, a validation's score, the grid's and the claims' per-run
lines) go through :func:`say`, the logger ``moefast`` at level INFO; :func:`configure` points it
at standard error, and ``quiet`` raises it to WARNING. Progress bars (:func:`progress_bar`) draw
only on a terminal and only when the channel is not quiet: redirected to a file or a CI log, a
run writes one line per validation (one per epoch under ``--eval-every none``; under a step
budget, one per ``eval_every`` steps, so an expert stage of 8-step epochs does not print 50
lines), never carriage-return frames. Lines written while a bar is on screen go through
``tqdm.write``, so they do not tear it. The grid, the claims and ``run_methods`` speak only here:
they take no ``say`` callback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["LOGGER", "configure", "progress_bar", "say"]

LOGGER = logging.getLogger("moefast")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a handler must not raise into the run
            self.handleError(record)


def configure(*, quiet: bool = False) -> None:
    """Send the channel to standard error (once), INFO and above, or WARNING and above when
    ``quiet``. The command line calls this; a library user may attach their own handlers."""
    if not any(isinstance(h, _TqdmHandler) for h in LOGGER.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(logging.WARNING if quiet else logging.INFO)


def say(message: str) -> None:
    """One line to the user, on the channel (silent until :func:`configure` or a handler)."""
    LOGGER.info(message)


def progress_bar(*, enabled: bool = True, force: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on standard error, drawn only when ``enabled``, the channel is not quiet and
    standard error is a terminal (an unconfigured channel, as in library use without
    :func:`configure`, counts as quiet); ``force`` draws it whatever these say (a caller's
    explicit ``progress=True``)."""
    shown = force or (enabled and LOGGER.isEnabledFor(logging.INFO) and sys.stderr.isatty())
    return tqdm(file=sys.stderr, disable=not shown, **kwargs)
