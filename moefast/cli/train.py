"""``moefast train``: a backbone trained as base, MLoRA and MoE-MLoRA, compared side by side.

With no arguments it trains DeepFM with the three towers on the default synthetic dataset and
prints per-domain AUC, mean AUC and WAUC side by side. Flags and the keys of a TOML file
(``--config``) map onto the same frozen dataclasses (:class:`RunConfig`, :class:`DataConfig`,
:class:`TrainConfig`); a TOML key is a flag's name without the dashes (``max-epochs = 3`` or
``max_epochs = 3``), and a flag given on the command line wins over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import math
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moefast import log
from moefast.cli._applies import check_dataset_options, check_run, unused_keys
from moefast.cli._options import (
    DATA_OPTIONS,
    RUN_OPTIONS,
    TRAIN_OPTIONS,
    UserError,
    add_config_and_quiet,
    add_option_groups,
    check_data_options,
    converters,
    given_options,
    load_dataset,
    parse_count_or_none,
    read_toml,
)
from moefast.config import DataConfig, RunConfig, TowerKind, TrainConfig
from moefast.runs.files import (
    CHECKPOINTS,
    CONFIG_TOML,
    DATA_REFERENCE,
    METRICS,
    PER_DOMAIN_AUC_PLOT,
    TABLE,
    VOCAB,
)

__all__ = ["NAME", "add_parser", "check_before_data", "comparison_table", "config_toml", "read_config",
           "resolve_config", "resume_config", "resume_note", "run"]

NAME = "train"
OPTIONS = converters(DATA_OPTIONS + RUN_OPTIONS + TRAIN_OPTIONS)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``moefast``'s subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="train base / MLoRA / MoE-MLoRA and compare them",
        description="Train a backbone with base, MLoRA and MoE-MLoRA towers and print a "
        "side-by-side table of per-domain AUC, mean AUC and WAUC.",
    )
    add_config_and_quiet(parser, "no progress bars or per-epoch lines")
    add_option_groups(parser, (("data", DATA_OPTIONS), ("model", RUN_OPTIONS), ("training", TRAIN_OPTIONS)))
    parser.add_argument(
        "--resume", default=None, metavar="DIR",
        help="continue the killed or stopped run in the run directory DIR from its last snapshot "
        "(docs/cli.md), with its recorded options (a flag that differs from them is refused)",
    )
    parser.add_argument(
        "--nproc", type=int, default=None, metavar="N",
        help="train data-parallel on N local processes: starts torchrun's elastic launcher "
        "(the same as torchrun --nproc-per-node N -m moefast train ...; docs/distributed.md)",
    )
    return parser


def read_config(path: str) -> dict[str, Any]:
    """A ``moefast train`` TOML config file, converted like the flags."""
    return read_toml(path, OPTIONS)


def run(args: argparse.Namespace) -> int:
    """Run ``moefast train`` for parsed ``args``; user mistakes raise :class:`UserError`."""
    nproc = vars(args).pop("nproc", None)
    resume = vars(args).pop("resume", None)
    options = read_config(args.config) if args.config else {}
    options.update(given_options(args))  # flags win over the file
    if resume is not None:
        config, quiet = resume_config(resume, options)
        note = resume_note(config)
        # Said once: by this process, or under torchrun (--nproc's ranks included) by rank 0.
        if note is not None and nproc is None and os.environ.get("RANK", "0") == "0":
            print(f"moefast: warning: --resume {resume}: {note}", file=sys.stderr, flush=True)
        if nproc is not None:
            from moefast.cli._launch import launch

            check_before_data(config)  # here, not in each rank: one line, and no rank starts
            return launch(config, config_toml(config), quiet, nproc, resume=True)
        return _train(config, quiet, resume=True)
    try:
        config, quiet = resolve_config(options)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    check_run(config, given_options(args))  # options that do nothing here (docs/cli.md)
    if nproc is not None:
        from moefast.cli._launch import launch

        check_before_data(config)  # here, not in each rank: one line, and no rank starts
        return launch(config, config_toml(config), quiet, nproc)
    return _train(config, quiet)


def _settings(config: RunConfig) -> dict[str, Any]:
    """The command's settings record (:func:`moefast.runs.settings.settings_record`): what
    ``--resume`` compares between the recorded ``config.toml`` and the options given now."""
    from moefast.runs.settings import settings_record

    others = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("train", "backend")}
    record = settings_record(config.train, config.backend, **others)
    record["data"].pop("read_ahead", None)  # speed only: a resume may change a stream's read-ahead window
    return record


def resume_config(run_dir: str, options: Mapping[str, Any]) -> tuple[RunConfig, bool]:
    """The configuration of ``--resume run_dir``: the run's recorded ``config.toml`` with
    ``options`` (a ``--config`` file's keys and the flags) over it; an option whose value differs
    from the recorded one is refused, naming every such key."""
    from moefast.runs.settings import differing_keys

    where = Path(run_dir)
    recorded_file = where / CONFIG_TOML
    if not where.is_dir():
        raise UserError(f"--resume {run_dir!r}: no such run directory")
    if not recorded_file.is_file():
        raise UserError(f"--resume {run_dir!r}: {_not_resumable(where)}")
    if options.get("overwrite"):
        raise UserError("--resume continues a run and --overwrite replaces it: give one of them")
    if "out" in options and Path(options["out"]) != where:
        raise UserError(f"--resume {run_dir!r} continues that directory; --out {options['out']!r} names another")
    recorded = read_config(str(recorded_file))
    try:
        before, _ = resolve_config({**recorded, "out": run_dir})
        config, quiet = resolve_config({**recorded, **options, "out": run_dir})
        keys = differing_keys(_settings(before), _settings(config))
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if keys:
        raise UserError(f"--resume {run_dir!r}: options that differ from the run's ({', '.join(keys)}; recorded "
                        f"in {str(recorded_file)!r}): drop them to continue the run, or start a new one")
    return config, quiet


def resume_note(config: RunConfig) -> str | None:
    """What ``--resume`` does for the methods of ``config.out`` that hold no resume snapshot
    (killed before their first epoch ended, not started yet, or the file deleted): they start from
    their first epoch. None when every method has one. A method with results but no snapshot is
    refused by ``fit`` itself (it could not continue), so it is not described here."""
    from moefast.runs.snapshot import SNAPSHOT

    assert config.out is not None
    out = Path(config.out)
    several = len(config.methods) > 1
    fresh = []
    for kind in config.methods:
        folder = out / kind.value if several else out
        has_results = (folder / CHECKPOINTS).exists() or (folder / METRICS).exists()
        if not (folder / SNAPSHOT).is_file() and not has_results:
            fresh.append(kind.value)
    if not fresh:
        return None
    if several:
        what = f"method{'s' if len(fresh) > 1 else ''} {', '.join(fresh)} {'have' if len(fresh) > 1 else 'has'}"
    else:
        what = "the run has"
    return (f"{what} no resume snapshot ({SNAPSHOT}: not started, stopped before its first epoch ended, or the "
            f"file was deleted); {'it starts' if len(fresh) == 1 else 'they start'} from the first epoch with the "
            "run's recorded options")


def _not_resumable(where: Path) -> str:
    """Why a directory without ``config.toml`` cannot be resumed from the command line, and what to
    do instead."""
    from moefast.experiments.grid import LOCK_FILE
    from moefast.runs.rundir import MARKER
    from moefast.runs.snapshot import SETTINGS

    grid = next((p for p in where.resolve().parents if (p / LOCK_FILE).exists()), None)
    if grid is not None and (where / MARKER).exists():
        return (f"a cell of the moefast grid in {str(grid)!r}: rerun the same moefast grid command, which "
                "continues its interrupted cells")
    if not (where / MARKER).exists():
        return f"not a moefast run directory (no {MARKER}); name the directory a moefast train run wrote"
    if (where / SETTINGS).exists():
        return ("a run directory written by fit() (no config.toml): continue it in Python with "
                "fit(..., out_dir=..., resume=True)")
    used = any(entry.name != MARKER for entry in where.iterdir())
    return (f"holds no config.toml (killed while its data loaded, before training began); start it again "
            f"with --out {where!s}{' --overwrite' if used else ''}")


def resolve_config(options: Mapping[str, Any]) -> tuple[RunConfig, bool]:
    """Map merged options (TOML keys / flag dests) onto :class:`RunConfig`; also return quiet."""
    values = dict(options)
    quiet = bool(values.pop("quiet", False))
    data = DataConfig(**{k: values.pop(k) for k in list(values) if k in DataConfig.__dataclass_fields__})
    train_fields = {k: values.pop(k) for k in list(values) if k in TrainConfig.__dataclass_fields__}
    train = TrainConfig(**train_fields, progress=not quiet)
    run_fields: dict[str, Any] = {}
    if "method" in values:
        run_fields["methods"] = values.pop("method")
    for key in ("model", "experts_per_domain", "backend", "out", "gate_init", "gate_own_weight", "overwrite"):
        if key in values:
            run_fields[key] = values.pop(key)
    assert not values, f"unmapped options {values}"
    return RunConfig(data=data, train=train, **run_fields), quiet


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, enum.Enum):
        return _toml_value(value.value)
    if isinstance(value, tuple | list):
        return ", ".join(str(v.value if isinstance(v, enum.Enum) else v) for v in value).join('""')
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_toml(config: RunConfig) -> str:
    """The resolved configuration as a TOML file that ``--config`` reads back."""
    lines = ["# moefast train: resolved configuration (moefast train --config <this file>)"]
    items: list[tuple[str, Any]] = [(f.name, getattr(config.data, f.name)) for f in dataclasses.fields(config.data)]
    items += [("model", config.model), ("method", config.methods),
              ("experts_per_domain", config.experts_per_domain), ("backend", config.backend),
              ("gate_init", config.gate_init), ("gate_own_weight", config.gate_own_weight)]
    items += [(f.name, getattr(config.train, f.name)) for f in dataclasses.fields(config.train)
              if f.name in OPTIONS]
    # Options no method of this config uses are left out: a method's own file of a multi-method
    # run then reads back for that method alone (docs/cli.md, "Options that do nothing").
    unused = unused_keys(config.methods, config.train)
    for key, value in items:
        if key in unused:
            continue
        if value is None and OPTIONS.get(key) is parse_count_or_none:
            lines.append(f'{key} = "none"')  # no cap / per-epoch: not the default's value
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null".rjust(width)
    return f"{value:.4f}".rjust(width)


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Per-domain test AUC, mean AUC, WAUC and logloss, one column per method."""
    methods = list(results)
    first = results[methods[0]]["test"]["per_domain"]
    name_w = max(len("logloss"), *(len(str(row["name"])) for row in first))
    col_w = max(9, *(len(m) for m in methods))
    header = f"{'domain':<{name_w}}  {'n test':>7}  " + "  ".join(m.rjust(col_w) for m in methods)
    lines = [header, "-" * len(header)]
    for k, row in enumerate(first):
        cells = [_fmt(results[m]["test"]["per_domain"][k]["auc"], col_w) for m in methods]
        lines.append(f"{row['name']!s:<{name_w}}  {row['n']:>7}  " + "  ".join(cells))
    lines.append("-" * len(header))
    for label, key in (("mean AUC", "mean_auc"), ("WAUC", "wauc"), ("logloss", "logloss")):
        cells = [_fmt(results[m]["test"][key], col_w) for m in methods]
        lines.append(f"{label:<{name_w}}  {'':>7}  " + "  ".join(cells))
    seconds = [sum(s["seconds"] for s in results[m]["stages"]) for m in methods]
    lines.append(f"{'seconds':<{name_w}}  {'':>7}  " + "  ".join(f"{s:.1f}".rjust(col_w) for s in seconds))
    return "\n".join(lines)


def check_before_data(config: RunConfig) -> None:
    """Every check of ``config`` that needs no data: the backend, the device, the model's name,
    the data options (a table's schema and file list).
    ``moefast train --nproc`` runs it (and the run directory's check) before any rank starts."""
    from moefast import models
    from moefast.ops._backend import parse_backend
    from moefast.train.loop import check_device

    if config.backend is not None:
        try:
            parse_backend(config.backend)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    try:
        check_device(config.train.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if config.model.lower() not in models.MODELS:
        raise UserError(f"unknown model {config.model!r}; choose one of {', '.join(sorted(models.MODELS))}")
    check_data_options(config.data)


def _train(config: RunConfig, quiet: bool, *, resume: bool = False) -> int:
    from moefast.runs.rundir import RunDirectoryError, claim_run_dir
    from moefast.runs.snapshot import Preempted
    from moefast.train.parallel import data_parallel as distributed

    check_before_data(config)
    if config.out is None and distributed.launched():
        # Each rank (and each torchrun restart) would name its own timestamped directory: the
        # ranks would read different snapshots, and a restart would not find the run it continues.
        raise UserError("under torchrun, give --out DIR: every rank and every restart must use the same "
                        "run directory (moefast train --nproc N picks one for you)")
    out = Path(config.out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))

    # Under torchrun: join the job; rank 0 alone claims and writes the run directory.
    parallel = distributed.init_from_env(config.train.device)
    if parallel is not None and distributed.restarted() and not resume:
        # torchrun restarted the job (--max-restarts): continue from the run's last snapshot.
        resume = True
        config = dataclasses.replace(config, overwrite=False)
    finished = False
    try:
        if parallel is not None and not parallel.is_writer:
            quiet_config = dataclasses.replace(config, train=dataclasses.replace(config.train, progress=False))
            status = _train_into(quiet_config, True, out, writer=False, resume=resume)
        else:
            # Before the data loads: an unusable --out (a file, unwritable, another folder,
            # another run's without --overwrite, in use) is one line now, not after minutes of
            # loading.
            try:
                claim = claim_run_dir(out, overwrite=config.overwrite, resume=resume)
            except RunDirectoryError as exc:
                raise UserError(f"{'--resume' if resume else '--out'}: {exc}") from None
            with claim:
                status = _train_into(config, quiet, out, resume=resume)
        finished = True
        return status
    except Preempted:
        if parallel is not None:
            # Every rank stopped at the same step boundary. Once one rank exits, torchrun sends
            # SIGTERM to the others: ignored from here, so that no rank dies while rank 0
            # writes the snapshot or in the barrier below.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            finished = True
        raise
    finally:
        if parallel is not None:
            distributed.leave(finished)


def _train_into(config: RunConfig, quiet: bool, out: Path, writer: bool = True, *, resume: bool = False) -> int:
    from moefast.experiments.methods import check_methods, run_methods
    from moefast.ops._backend import BackendUnavailableError
    from moefast.runs.rundir import plot_methods, write_json
    from moefast.runs.writer import write_text
    from moefast.train import FitResult

    dataset = load_dataset(config.data, progress=None if not quiet else False)
    check_dataset_options(config.train, dataset)
    check_methods(config, dataset)  # a bad own-expert weight for these domains: before any file
    log.configure(quiet=quiet)
    log.say(f"dataset {dataset.name}: {len(dataset.train)} train / {len(dataset.val)} val / "
        f"{len(dataset.test)} test rows, {dataset.num_domains} domains")
    if writer:
        write_text(out / CONFIG_TOML, config_toml(config))
    if writer and "table" in dataset.info:
        from moefast.data.table import save_vocab

        save_vocab(dataset, out)  # once, at the top; each method's directory refers to it
    several = len(config.methods) > 1

    def record(kind: TowerKind, run_dir: Path | None, _result: FitResult) -> None:
        if several and writer:
            assert run_dir is not None
            write_text(run_dir / CONFIG_TOML,
                        config_toml(dataclasses.replace(config, methods=(kind,), out=str(run_dir))))
            if "table" in dataset.info:
                write_json(run_dir / DATA_REFERENCE, {"vocab": f"../{VOCAB}"})

    try:
        fitted = run_methods(dataclasses.replace(config, out=str(out)), dataset, resume=resume, after=record)
    except BackendUnavailableError as exc:
        raise UserError(str(exc)) from None
    results = {name: result.metrics for name, result in fitted.items()}
    if not writer:
        return 0
    table = comparison_table(results)
    print(f"{dataset.name}, {config.model}: test metrics (AUC per domain; null = one class)")
    print(table)
    write_text(out / TABLE, table + "\n")
    if several:
        write_json(out / METRICS, {"methods": results})
        plot_methods(out / PER_DOMAIN_AUC_PLOT, results)
    print(f"run directory: {out}")
    return 0
