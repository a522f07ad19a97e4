"""``moefast reproduce``: the method's claims report (see :mod:`moefast.experiments.claims`).

Runs the claims plan (Taobao-like and MovieLens-like synthetic settings, or the real Taobao and
MovieLens-1M files with --taobao-dir / --movielens-dir; every method variant, both batch
protocols, several seeds) and writes ``claims.md``, ``claims.png`` and the raw
``claims-runs.csv`` into ``--out`` (default ``docs/results``). Every finished run is saved at
once; rerunning the same command skips them, so a budget-limited or killed run continues.
"""

from __future__ import annotations

import argparse
from typing import Any

from moefast import log
from moefast.cli._options import UserError, parse_on_off
from moefast.experiments.claims import SECTIONS

__all__ = ["NAME", "add_parser", "run"]

NAME = "reproduce"


def _sections(text: str) -> tuple[str, ...]:
    if text.strip().lower() == "all":
        return SECTIONS
    parts = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in SECTIONS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: choose sections from {', '.join(SECTIONS)} or all")
    return parts


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand to ``moefast``'s subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="run the claims plan (resumable) and write docs/results/claims.md",
        description=(__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument("--sections", type=_sections, default=None,
                        help=f"comma-separated: {', '.join(SECTIONS)}, or all (default)")
    parser.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds (default 1,2,3,4,5)")
    parser.add_argument("--variants", type=lambda t: tuple(p.strip() for p in t.split(",") if p.strip()),
                        default=None, help="comma-separated subset: base, mlora, moe-specialist, moe-random, "
                        "moe-seeds-compat (-k2..-k4 for more experts); default all")
    parser.add_argument("--rows", type=int, default=None, help="rows of every synthetic dataset (default 200,000: CLAIMS_ROWS)")
    parser.add_argument("--budget", choices=("converged", "cap10"), default=None,
                        help="run only this budget (default: each section's; the core runs both)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="the converged budget's step cap (default 20000; for smoke runs)")
    parser.add_argument("--frozen-path-dropout", type=parse_on_off, default=None,
                        help="on | off for the sections after the core (default: the rule over the core's runs)")
    parser.add_argument("--budget-hours", type=float, default=None,
                        help="start no new run after this many hours (rerun to continue)")
    parser.add_argument("--model", default=None, help="backbone (default deepfm)")
    parser.add_argument("--backend", default=None, help="reference | fast | auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="report folder (default docs/results)")
    parser.add_argument("--taobao-dir", default=None,
                        help="run on real Taobao-N (raw files with the shipped vectors) instead of the taobao preset")
    parser.add_argument("--movielens-dir", default=None,
                        help="run on real MovieLens-1M (gender, age, occupation) instead of the movielens preset")
    parser.add_argument("--cache-dir", default=None, help="cache of the real datasets' processed forms")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the CSV, train nothing")
    parser.add_argument("--quiet", "-q", action="store_true", help="no per-run lines")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``moefast reproduce`` for parsed ``args``; user mistakes raise :class:`UserError`."""
    import torch

    from moefast.experiments.claims import ClaimsConfig, run_claims, write_report

    fields = {name: getattr(args, name) for name in ("sections", "seeds", "rows", "budget", "max_steps",
                                                     "frozen_path_dropout", "budget_hours",
                                                     "model", "backend", "out", "taobao_dir", "variants", "movielens_dir",
                                                     "cache_dir")}
    try:
        config = ClaimsConfig(**{k: v for k, v in fields.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    log.configure(quiet=args.quiet)
    paths = write_report(config) if args.report_only else run_claims(config)
    print(f"claims report: {paths['claims.md']} (runs: {paths['claims-runs.csv']})")
    return 0
