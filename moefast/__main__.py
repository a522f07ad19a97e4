"""``python -m moefast`` (and ``torchrun -m moefast``): the ``moefast`` command."""

from __future__ import annotations

import sys

from moefast.cli import main

if __name__ == "__main__":
    sys.exit(main())
