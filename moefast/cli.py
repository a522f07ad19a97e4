"""The ``moefast`` command.

``moefast train`` with no arguments trains DeepFM as base, MLoRA and MoE-MLoRA on the default
synthetic dataset and prints per-domain AUC, mean AUC and WAUC side by side. Flags and the keys
of a TOML file (``--config``) map onto the same frozen dataclasses (:class:`RunConfig`,
:class:`DataConfig`, :class:`TrainConfig`); a TOML key is a flag's name without the dashes
(``max-epochs = 3`` or ``max_epochs = 3``), and a flag given on the command line wins over the
file. User mistakes (a bad path, an unknown model, experts inconsistent with the domains) end
with one ``moefast: error: ...`` line and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import math
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moefast.config import (
    BatchMode,
    DataConfig,
    EmbeddingOptimizer,
    ExpertStopRule,
    MLoRAMode,
    RunConfig,
    TowerKind,
    TrainConfig,
)

__all__ = ["build_parser", "main", "resolve_config"]

# Time budget of the default run (no flags) on 2 CPU cores, 200,000 rows x 10 domains.
DEFAULT_MAX_EPOCHS = TrainConfig().max_epochs


class UserError(Exception):
    """A mistake in the command line or the config file: reported as one line."""


# Every option: (flag, dest, type, help). ``dest`` is the TOML key (dashes also accepted).
_Conv = Callable[[str], Any]


def _choice(kind: type[enum.Enum]) -> _Conv:
    def parse(text: str) -> Any:
        try:
            return kind(str(text).lower())
        except ValueError:
            choices = ", ".join(str(k.value) for k in kind)
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {choices}") from None

    parse.__name__ = kind.__name__
    return parse


def _methods(text: str) -> tuple[TowerKind, ...]:
    if str(text).lower() == "all":
        return tuple(TowerKind)
    parsed = []
    for part in str(text).split(","):
        try:
            parsed.append(TowerKind(part.strip().lower()))
        except ValueError:
            choices = ", ".join([*(k.value for k in TowerKind), "all"])
            raise argparse.ArgumentTypeError(f"unknown method {part.strip()!r}; choose {choices}") from None
    return tuple(parsed)


def _bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


_Option = tuple[str, type | _Conv, str]
_DATA_OPTIONS: list[_Option] = [
    ("dataset", str, "dataset name: synthetic (default), movielens-1m, taobao, amazon-6"),
    ("preset", str, "synthetic preset: paper (default) or wide"),
    ("domain", str, "which column is the domain (MovieLens: gender, age or occupation)"),
    ("data-dir", str, "folder of a real dataset's raw files"),
    ("rows", int, "synthetic: number of rows"),
    ("num-domains", int, "synthetic: number of domains"),
    ("num-users", int, "synthetic: number of users"),
    ("num-items", int, "synthetic: number of items"),
    ("diversity", float, "synthetic: how far each domain's click function departs from the shared one"),
    ("imbalance", float, "synthetic: domain-size imbalance"),
    ("data-seed", int, "synthetic: generator seed"),
]
_RUN_OPTIONS: list[_Option] = [
    ("model", str, "backbone (default deepfm)"),
    ("method", _methods, "base | mlora | moe-mlora | all (default), or a comma-separated list"),
    ("experts-per-domain", int, "MoE-MLoRA experts per domain (E = this x domains)"),
    ("backend", str, "reference | fast | auto"),
    ("out", str, "run directory (default runs/<timestamp>); one subdirectory per method"),
]
_TRAIN_OPTIONS: list[_Option] = [
    ("device", str, "torch device (default cpu)"),
    ("seed", int, "seed of the model's initial weights, batch order and dropout (default 1024)"),
    ("lr", float, "Adam learning rate (default 1e-3)"),
    ("batch-size", int, "training batch size (default 1024)"),
    ("eval-batch-size", int, "evaluation batch size"),
    ("l2", float, "L2 weight on embeddings and linear parts (default 1e-5)"),
    ("max-epochs", int, f"epoch cap of every stage (default {DEFAULT_MAX_EPOCHS})"),
    ("expert-max-epochs", int, "epoch cap of each MoE-MLoRA expert stage"),
    ("gate-max-epochs", int, "epoch cap of the MoE-MLoRA gate stage"),
    ("patience", int, "early-stopping patience in epochs (default 3)"),
    ("batch-mode", _choice(BatchMode), "single-domain (default) or mixed batches"),
    ("expert-stop", _choice(ExpertStopRule), "own-domain (default) or all-domains (the seeds')"),
    ("mlora-mode", _choice(MLoRAMode), "joint (default) or pretrain-freeze"),
    ("embedding-optimizer", _choice(EmbeddingOptimizer),
     "adam (default: dense, the method's), lazy-adam or rowwise-adagrad (sparse, fused in backward)"),
    ("embedding-lr", float, "learning rate of the embedding optimizer (default: --lr)"),
    ("train-backbone-in-later-stages", _bool,
     "keep embeddings and non-tower parts trainable in the expert and gate stages"),
    ("seeds-compat", _bool, "behave like the seeds' public code (see README): backbone trainable in every "
     "stage, best validation score carried across stages, weights reverted to the best after every epoch"),
]
_FLAGS_WITHOUT_VALUE = {"train-backbone-in-later-stages", "seeds-compat"}
_ALL_OPTIONS = {name.replace("-", "_"): conv for name, conv, _ in _DATA_OPTIONS + _RUN_OPTIONS + _TRAIN_OPTIONS}


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_option_groups(
    parser: argparse.ArgumentParser, groups: Sequence[tuple[str, Sequence[_Option]]]
) -> None:
    """Add every ``(flag, type, help)`` option, one argument group per title.

    Defaults are SUPPRESSed: only flags actually given appear, so they override the TOML file.
    """
    for title, options in groups:
        group = parser.add_argument_group(title)
        for name, conv, text in options:
            if name in _FLAGS_WITHOUT_VALUE:
                group.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help=text)
            else:
                group.add_argument(f"--{name}", type=conv, default=argparse.SUPPRESS, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moefast", description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train base / MLoRA / MoE-MLoRA and compare them",
        description="Train a backbone with base, MLoRA and MoE-MLoRA towers and print a "
        "side-by-side table of per-domain AUC, mean AUC and WAUC.",
    )
    train.add_argument("--config", help="TOML file whose keys mirror the flags")
    train.add_argument("--quiet", "-q", action="store_true", default=None,
                       help="no progress bars or per-epoch lines")
    add_option_groups(train, (("data", _DATA_OPTIONS), ("model", _RUN_OPTIONS), ("training", _TRAIN_OPTIONS)))
    from moefast import cli_grid  # imported here: it imports this module

    cli_grid.add_parser(commands)
    return parser


def read_toml(path: str, options: Mapping[str, type | _Conv] = _ALL_OPTIONS) -> dict[str, Any]:
    """A TOML config file's keys (flag names, dashes or underscores) converted like the flags."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path!r} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest == "quiet":
            out[dest] = _bool(str(value))
            continue
        if dest not in options:
            raise UserError(f"config file {path!r}: unknown key {key!r}")
        conv = options[dest]
        if isinstance(value, list):  # method = ["base", "mlora"]
            value = ",".join(str(v) for v in value)
        if conv is int and (isinstance(value, bool) or not isinstance(value, int | str)):
            raise UserError(f"config file {path!r}: key {key!r} must be an integer, got {value!r}")
        try:
            out[dest] = conv(value) if isinstance(value, str) or conv in (int, float) else conv(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"config file {path!r}: key {key!r}: {exc}") from None
    return out


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
    for key in ("model", "experts_per_domain", "backend", "out"):
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
              ("experts_per_domain", config.experts_per_domain), ("backend", config.backend)]
    items += [(f.name, getattr(config.train, f.name)) for f in dataclasses.fields(config.train)
              if f.name in _ALL_OPTIONS]
    for key, value in items:
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _load_dataset(data: DataConfig) -> Any:
    from moefast import data as data_module

    options: dict[str, Any] = {}
    if data.dataset == "synthetic":
        for key, dest in (("preset", "preset"), ("rows", "rows"), ("num_domains", "num_domains"),
                          ("num_users", "num_users"), ("num_items", "num_items"),
                          ("diversity", "diversity"), ("imbalance", "imbalance"), ("data_seed", "seed")):
            value = getattr(data, key)
            if value is not None:
                options[dest] = value
        for key in ("domain", "data_dir"):
            if getattr(data, key) is not None:
                raise UserError(f"--{key.replace('_', '-')} does not apply to the synthetic dataset")
    else:
        for key in ("preset", "rows", "num_domains", "num_users", "num_items", "diversity", "imbalance",
                    "data_seed"):
            if getattr(data, key) is not None:
                raise UserError(f"--{key.replace('_', '-')} applies to the synthetic dataset only")
        if data.data_dir is None:
            raise UserError(f"dataset {data.dataset!r} needs --data-dir (the folder of its raw files)")
        if not Path(data.data_dir).is_dir():
            raise UserError(f"--data-dir {data.data_dir!r} is not a directory")
        options["raw_dir"] = data.data_dir
        if data.domain is not None:
            options["domain"] = data.domain
    return data_module.load(data.dataset, **options)


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


def _train(config: RunConfig, quiet: bool) -> int:
    import torch

    from moefast import models
    from moefast.ops._backend import BackendUnavailableError, parse_backend
    from moefast.train import fit
    from moefast.train.rundir import plot_methods, write_json

    if config.backend is not None:
        try:
            parse_backend(config.backend)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    try:
        device = torch.device(config.train.device)
    except RuntimeError as exc:
        raise UserError(f"--device {config.train.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {config.train.device!r}: no CUDA device is available here")
    if config.model.lower() not in models.MODELS:
        raise UserError(f"unknown model {config.model!r}; choose one of {', '.join(sorted(models.MODELS))}")
    out = Path(config.out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a directory")
    dataset = _load_dataset(config.data)
    say = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"dataset {dataset.name}: {len(dataset.train)} train / {len(dataset.val)} val / "
        f"{len(dataset.test)} test rows, {dataset.num_domains} domains")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(config_toml(config))
    results: dict[str, dict[str, Any]] = {}
    several = len(config.methods) > 1
    for kind in config.methods:
        run_dir = out / kind.value if several else out
        model = models.build(config.model, dataset, kind, experts_per_domain=config.experts_per_domain,
                             seed=config.train.seed)
        say(f"training {config.model} / {kind.value} -> {run_dir}")
        try:
            result = fit(model, dataset, config.train, backend=config.backend, out_dir=run_dir)
        except BackendUnavailableError as exc:
            raise UserError(str(exc)) from None
        if several:
            (run_dir / "config.toml").write_text(
                config_toml(dataclasses.replace(config, methods=(kind,), out=str(run_dir)))
            )
        results[kind.value] = result.metrics
    table = comparison_table(results)
    print(f"{dataset.name}, {config.model}: test metrics (AUC per domain; null = one class)")
    print(table)
    (out / "table.txt").write_text(table + "\n")
    if several:
        write_json(out / "metrics.json", {"methods": results})
        plot_methods(out / "per_domain_auc.png", results)
    print(f"run directory: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config") and v is not None}
    try:
        if args.command == "grid":
            from moefast import cli_grid

            return cli_grid.main(args)
        options = read_toml(args.config) if args.config else {}
        options.update(given)  # flags win over the file
        try:
            config, quiet = resolve_config(options)
        except (TypeError, ValueError) as exc:
            raise UserError(str(exc)) from None
        return _train(config, quiet)
    except (UserError, ValueError) as exc:
        # ValueError: the library's user-facing errors (unknown dataset option, bad raw file,
        # experts inconsistent with the domains...), which name the offending value.
        print(f"moefast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moefast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
