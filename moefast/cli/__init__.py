"""The ``moefast`` command: multi-domain CTR training with MLoRA and MoE-MLoRA towers.

Each subcommand is a module of this package that exposes ``NAME``, ``add_parser(subparsers)``
and ``run(args) -> int``; a new command is a new module plus one entry in :data:`COMMANDS`.
User mistakes (a bad path, an unknown model, experts inconsistent with the domains) end with
one ``moefast: error: ...`` line and exit status 2, not a traceback. A file that cannot be
written (a full disk) is one line and status 1; a run stopped by ``SIGTERM`` (preemption) saves
its state, says how to resume it, and exits with status 143 (128 + SIGTERM).

Owns: parsing, one-line errors and printing. The top of the house: it may import any room, and
none imports it (the public exception classes live in :mod:`moefast.errors`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Protocol

from moefast._version import __version__
from moefast.cli import export, grid, predict, reproduce, train, vocab
from moefast.cli._options import Parser, UserError

__all__ = ["COMMANDS", "Command", "build_parser", "main", "version"]


class Command(Protocol):
    """What a command module provides (checked by mypy against every entry of COMMANDS)."""

    NAME: str

    def add_parser(self, commands: argparse._SubParsersAction) -> argparse.ArgumentParser: ...

    def run(self, args: argparse.Namespace) -> int: ...


# The subcommands, in the order `moefast --help` lists them.
COMMANDS: tuple[Command, ...] = (train, grid, reproduce, export, predict, vocab)


class _Version(argparse.Action):
    """``--version``: the version, then which compiled modules this install runs (it imports
    torch, so it is computed only when asked for)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and the compiled modules in use, then exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object, **__: object) -> None:
        from moefast import _ext

        print(f"moefast {__version__}\n{_ext.build_report()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moefast", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--version", action=_Version)
    subparsers = parser.add_subparsers(dest="command", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    (command,) = (c for c in COMMANDS if c.NAME == args.command)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(command, args)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """A stage that ended at its cap as one ``moefast: warning:`` line; other warnings as Python
    prints them (their class names say which fallback or notice they are)."""
    from moefast.train.errors import CapWarning

    if issubclass(category, CapWarning):
        print(f"moefast: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run(command: Command, args: argparse.Namespace) -> int:
    try:
        return command.run(args)
    except (UserError, ValueError) as exc:
        # ValueError: the library's user-facing errors (unknown dataset option, bad raw file,
        # experts inconsistent with the domains...), which name the offending value.
        print(f"moefast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moefast: interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:
        # numpy's names the size it could not allocate; a bare MemoryError names nothing.
        print(f"moefast: error: out of memory{': ' + str(exc) if str(exc) else ''} (smaller data, or a "
              "streamed table with --stream)", file=sys.stderr)
        return 1
    except OSError as exc:
        from moefast.runs.writer import WriteError

        if not isinstance(exc, WriteError):
            raise
        # A full disk or a failed write: nothing was left under the file's final name, and the
        # run resumes from its last snapshot once there is room (docs/reliability.md).
        print(f"moefast: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from moefast.runs.snapshot import PREEMPTED_STATUS, Preempted

        if not isinstance(exc, Preempted):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; rank 0 says so
            print(f"moefast: {exc}", file=sys.stderr)
        return PREEMPTED_STATUS
