"""``moefast grid``: the experiment grid from the command line (see :mod:`moefast.experiments.grid`).

List-valued flags take comma-separated values (``--model deepfm,nfm``, ``--diversity 0.9,0.1``,
``--seeds 1024,1025``); in the TOML file (``--config``) they may also be arrays. A flag given on
the command line wins over the file. Every data setting is ``dataset x domain x diversity``;
the other data options apply to all of them. Rerunning the same command resumes the grid.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from moefast import log
from moefast.cli._applies import check_options
from moefast.cli._options import (
    DEFAULT_PRESET,
    TRAIN_OPTIONS,
    Option,
    UserError,
    add_config_and_quiet,
    add_option_groups,
    converters,
    given_options,
    load_dataset,
    parse_methods,
    read_toml,
)
from moefast.config import DataConfig, TrainConfig

__all__ = ["NAME", "add_parser", "resolve_grid", "run"]

NAME = "grid"


def _strings(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in str(text).split(",") if p.strip())
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing")
    return parts


def _list_of(conv: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(conv(p) for p in _strings(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {conv.__name__}") from None

    parse.__name__ = f"list of {conv.__name__}"
    return parse


def _models(text: str) -> tuple[str, ...]:
    from moefast.experiments.grid import BACKBONES

    return BACKBONES if str(text).lower() == "all" else tuple(m.lower() for m in _strings(text))


_DATA: list[Option] = [
    ("dataset", _strings, "datasets, comma-separated (default synthetic)"),
    ("domain", _strings, "domain columns of the real datasets, comma-separated (MovieLens: gender,age,occupation)"),
    ("diversity", _list_of(float), "synthetic domain diversities, comma-separated (e.g. 0.9,0.1)"),
    ("preset", str, f"synthetic preset: {DEFAULT_PRESET} (default; Taobao-like, pretrained tables), "
     "movielens, paper or wide"),
    ("data-dir", str, "folder of a real dataset's raw files"),
    ("rows", int, "synthetic: number of rows"),
    ("num-domains", int, "synthetic: number of domains"),
    ("imbalance", float, "synthetic: domain-size imbalance"),
    ("clusters", int, "synthetic: related domains: the number K of clusters, domain d in cluster d mod K"),
    ("cluster-spread", float, "synthetic: related domains: distance from the cluster's prototype, in (0, 1] "
     "(default 1: independent)"),
    ("data-seed", int, "synthetic: generator seed"),
]
_GRID: list[Option] = [
    ("model", _models, "backbones, comma-separated, or all (default all eight)"),
    ("method", parse_methods, "base | mlora | moe-mlora | all (default), comma-separated"),
    ("experts-per-domain", _list_of(int), "MoE-MLoRA experts per domain k, one cell each (default 1,2,3,4)"),
    ("seeds", _list_of(int), "seeds, one run each (default 1024,1025)"),
    ("backend", str, "reference | fast | auto"),
    ("out", str, "grid directory (default runs/grid); rerun to resume"),
]
# The grid's --seeds replaces train's --seed.
_TRAINING = [option for option in TRAIN_OPTIONS if option[0] != "seed"]
_ALL = converters(_DATA + _GRID + _TRAINING)
_DATA_LISTS = ("dataset", "domain", "diversity")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``grid`` subcommand to ``moefast``'s subparsers."""
    grid: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="run an experiment grid (data x backbone x method x seed), resumable",
        description=(__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    add_config_and_quiet(grid, "no progress bars or per-cell lines")
    add_option_groups(grid, (("data", _DATA), ("grid", _GRID), ("training", _TRAINING)))
    return grid


def resolve_grid(options: Mapping[str, Any]) -> tuple[Any, bool]:
    """Merged options (TOML keys / flag dests) -> (:class:`~moefast.experiments.grid.GridConfig`, quiet)."""
    from moefast.experiments.grid import GridConfig

    values = dict(options)
    quiet = bool(values.pop("quiet", False))
    lists = {key: values.pop(key, (None,)) for key in _DATA_LISTS}
    common = {k: values.pop(k) for k in list(values) if k in DataConfig.__dataclass_fields__}
    data = tuple(
        DataConfig(dataset=dataset or "synthetic", domain=domain, diversity=diversity, **common)
        for dataset in lists["dataset"] for domain in lists["domain"] for diversity in lists["diversity"]
    )
    # The preset a synthetic setting runs is named in its cell label, so that a grid directory
    # never mixes cells of one preset with those of another default.
    data = tuple(replace(d, preset=DEFAULT_PRESET) if d.dataset == "synthetic" and d.preset is None else d
                 for d in data)
    train = TrainConfig(**{k: values.pop(k) for k in list(values) if k in TrainConfig.__dataclass_fields__},
                        progress=not quiet)
    grid: dict[str, Any] = {}
    for dest, field in (("model", "models"), ("method", "methods"), ("experts_per_domain", "experts_per_domain"),
                        ("seeds", "seeds"), ("backend", "backend"), ("out", "out")):
        if dest in values:
            grid[field] = values.pop(dest)
    assert not values, f"unmapped options {values}"
    return GridConfig(data=data, train=train, **grid), quiet


def run(args: argparse.Namespace) -> int:
    """Run ``moefast grid`` for parsed ``args``; user mistakes raise :class:`UserError`."""
    from moefast.experiments.grid import run_grid
    from moefast.ops._backend import BackendUnavailableError, parse_backend

    options = read_toml(args.config, _ALL) if args.config else {}
    options.update(given_options(args))  # flags win over the file
    try:
        config, quiet = resolve_grid(options)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    experts = {"experts_per_domain": config.experts_per_domain} if "experts_per_domain" in options else None
    check_options(config.methods, config.train, experts, given_options(args))
    if config.backend is not None:
        try:
            parse_backend(config.backend)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    log.configure(quiet=quiet)
    try:
        paths = run_grid(config, load=load_dataset)
    except BackendUnavailableError as exc:
        raise UserError(str(exc)) from None
    print(paths["results.md"].read_text(), end="")
    print(f"grid directory: {config.out} (results.csv, results.md, results.png, runs.csv)")
    return 0
