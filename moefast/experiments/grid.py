"""``moefast grid``: the method's experiment grid, resumable, with a results table and a plot.

The grid is ``data setting x backbone x method x seed``, where a data setting is a dataset with
its options (a domain split of MovieLens, a diversity of the synthetic generator, ...) and a
method is ``base``, ``mlora`` or ``moe-mlora`` with ``k`` experts per domain (one cell per ``k``).
Each cell trains in its own run directory::

    <out>/cells/<data>/<backbone>/<method>/seed<seed>/   the run directory of moefast train
    <out>/cells/.../seed<seed>/cell.json                 written last: the cell is finished
    <out>/runs.csv                                       one row per finished cell
    <out>/results.csv, results.md                        mean and std of test WAUC per cell
    <out>/results.png                                    WAUC per backbone and method

A cell counts as finished only once ``cell.json`` exists (written atomically after training), so
a rerun skips finished cells and continues an interrupted one from its last snapshot
(``fit(..., resume=True)``). ``<out>/grid.json`` records the training settings and
``<out>/data.json`` the content fingerprint of each data setting: a rerun with other settings or
other data is refused, never mixed. A lock (``<out>/.moefast-grid``) refuses a second live grid
on the same directory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from moefast.config import (
    DataConfig,
    TowerConfig,
    TowerKind,
    TrainConfig,
    default_tower,
    load_options,
)
from moefast.data.dataset import MultiDomainDataset
from moefast.experiments.stats import mean_std
from moefast.log import say
from moefast.runs.rundir import hold_lock, write_json
from moefast.runs.settings import (
    GRID_SETTINGS,
    check_settings,
    dataset_fingerprint,
    read_json,
    settings_record,
)
from moefast.runs.snapshot import SNAPSHOT, Preempted
from moefast.runs.writer import pyplot, save_figure, write_frame, write_text

__all__ = ["GridCell", "GridConfig", "data_label", "load_data", "plan_grid", "run_grid", "write_results"]

# Module-level so the frozen dataclass default is one shared immutable value (ruff RUF009).
_QUIET_TRAINING = TrainConfig(progress=False)
BACKBONES = ("autoint", "dcn", "deepfm", "fibinet", "nfm", "pnn", "wdl", "xdeepfm")
DONE_FILE = "cell.json"
DATA_FILE = "data.json"  # the content fingerprint of each data setting
LOCK_FILE = ".moefast-grid"  # flock'ed while a grid runs in the directory


@dataclass(frozen=True)
class GridConfig:
    """One grid: the cartesian product of its tuples.

    Args:
        data: the data settings (dataset + options; ``DataConfig.domain`` is the domain split).
        models: backbones.
        methods: towers; MoE-MLoRA gives one cell per entry of ``experts_per_domain``.
        experts_per_domain: MoE-MLoRA's ``k`` values (the method's grid: 1..4).
        seeds: each seeds the model's initial weights, batch order and dropout of one run.
        train: training options shared by every cell (its ``seed`` is replaced per cell).
        tower: the tower (units, dropout, alpha or ranks, gate start) of every cell; ``None`` is
            :func:`~moefast.config.default_tower`: the method's (256, 128, 64) with the seeds'
            alpha per backbone and dataset, and a random gate start under ``seeds_compat``.
        backend: ``reference`` | ``fast`` | ``auto`` (``None``: ``MOEFAST_BACKEND``, then auto).
        out: the grid directory.
    """

    data: tuple[DataConfig, ...] = (DataConfig(),)
    models: tuple[str, ...] = BACKBONES
    methods: tuple[TowerKind, ...] = (TowerKind.BASE, TowerKind.MLORA, TowerKind.MOE_MLORA)
    experts_per_domain: tuple[int, ...] = (1, 2, 3, 4)
    seeds: tuple[int, ...] = (1024, 1025)
    train: TrainConfig = _QUIET_TRAINING
    tower: TowerConfig | None = None
    backend: str | None = None
    out: str = "runs/grid"

    def __post_init__(self) -> None:
        for name in ("data", "models", "methods", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"GridConfig.{name} must not be empty")
        if TowerKind.MOE_MLORA in self.methods and not self.experts_per_domain:
            raise ValueError("GridConfig.experts_per_domain must not be empty with moe-mlora")
        if any(k < 1 for k in self.experts_per_domain):
            raise ValueError(f"GridConfig.experts_per_domain must be >= 1, got {self.experts_per_domain!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"GridConfig.seeds has duplicates: {self.seeds!r}")
        if any(d.stream for d in self.data):
            raise ValueError("the grid loads each data setting once and trains every cell on it in memory: a streamed "
                             "table (stream) trains with moefast train --stream, one run at a time")


@dataclass(frozen=True)
class GridCell:
    """One run of the grid. ``experts_per_domain`` is 1 for base and MLoRA (unused there)."""

    data: DataConfig
    model: str
    method: TowerKind
    experts_per_domain: int
    seed: int

    @property
    def method_label(self) -> str:
        """``base``, ``mlora`` or ``moe-mlora-k<k>``."""
        if self.method is TowerKind.MOE_MLORA:
            return f"{self.method.value}-k{self.experts_per_domain}"
        return self.method.value

    def directory(self, out: Path) -> Path:
        return out / "cells" / data_label(self.data) / self.model / self.method_label / f"seed{self.seed}"


def data_label(data: DataConfig) -> str:
    """A readable, unique name of a data setting: the dataset and every option that is set
    (``synthetic``, ``synthetic_preset-paper_diversity-0.1``, ``movielens-1m_domain-age``).
    ``data_dir`` is left out: the same data in another folder is the same setting."""
    parts = [data.dataset]
    for f in fields(data):
        value = getattr(data, f.name)
        if f.name in ("dataset", "data_dir") or value is None:
            continue
        parts.append(f"{f.name.replace('_', '-')}-{value}")
    return "_".join(parts).replace("/", "-")


def load_data(data: DataConfig) -> MultiDomainDataset:
    """``moefast.data.load`` for a :class:`DataConfig` (``ValueError`` for an option that does
    not apply to the dataset, naming it): :func:`moefast.config.load_options`'s mapping."""
    from moefast import data as data_module

    return data_module.load(data.dataset, **load_options(data))


def plan_grid(config: GridConfig) -> list[GridCell]:
    """Every cell, data setting by data setting (each dataset is loaded once)."""
    cells = []
    for data in config.data:
        for model in config.models:
            for method in config.methods:
                ks = config.experts_per_domain if method is TowerKind.MOE_MLORA else (1,)
                for k in ks:
                    for seed in config.seeds:
                        cells.append(GridCell(data, model.lower(), method, k, seed))
    return cells


def run_grid(
    config: GridConfig,
    *,
    load: Callable[[DataConfig], MultiDomainDataset] = load_data,
) -> dict[str, Path]:
    """Run every unfinished cell, then write the results table and plot; a line per cell on the
    logging channel (:mod:`moefast.log`).

    Args:
        config: the grid.
        load: turns a data setting into a dataset (the CLI passes its own, whose errors are
            one line).

    Returns:
        The paths of ``runs.csv``, ``results.csv``, ``results.md`` and ``results.png``.

    An exception in a cell propagates after the cells before it are saved; rerunning the
    same grid resumes at that cell.
    """
    from moefast import models

    for name in config.models:
        if name.lower() not in models.MODELS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(models.MODELS))}")
    out = Path(config.out)
    with hold_lock(out / LOCK_FILE, f"grid directory {str(out)!r}"):
        # Temporary files of writes a killed grid never renamed (its records and tables; each
        # cell's own are removed when the cell resumes); under the lock no live writer owns them.
        for entry in out.glob(".*.tmp"):
            entry.unlink()
        _check_settings(config)
        cells = plan_grid(config)
        todo = [c for c in cells if not (c.directory(out) / DONE_FILE).exists()]
        say(f"grid {out}: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run")
        datasets: dict[DataConfig, MultiDomainDataset] = {}
        for number, cell in enumerate(todo, 1):
            if cell.data not in datasets:
                datasets.clear()  # one dataset in memory at a time; cells are grouped by data
                datasets[cell.data] = load(cell.data)
                _check_data(out, cell.data, datasets[cell.data])
            try:
                _run_cell(config, cell, datasets[cell.data], f"[{number}/{len(todo)}]")
            except Preempted as exc:
                raise Preempted(exc.run_dir, exc.where, "the same moefast grid command (it resumes this "
                                "cell)") from None
    return write_results(config)


def _run_cell(
    config: GridConfig, cell: GridCell, dataset: MultiDomainDataset, count: str) -> None:
    from moefast import models
    from moefast.train.loop import fit

    run_dir = cell.directory(Path(config.out))
    # An interrupted cell continues from its last snapshot (fit(resume=True): the same data,
    # model and options, checked). One without a snapshot (killed before its first epoch ended,
    # or by a moefast without resume) starts over: overwrite clears what it left, and only a
    # directory carrying the run marker.
    resumable = (run_dir / SNAPSHOT).exists()
    say(f"{count} {data_label(cell.data)} {cell.model} {cell.method_label} seed {cell.seed}"
        + (" (resumed)" if resumable else ""))
    start = time.perf_counter()
    model = models.build(cell.model, dataset, cell.method, experts_per_domain=cell.experts_per_domain,
                         tower_config=config.tower or default_tower(config.train), seed=cell.seed)
    result = fit(model, dataset, replace(config.train, seed=cell.seed), backend=config.backend,
                 out_dir=run_dir, resume=resumable, overwrite=not resumable)
    test = result.metrics["test"]
    write_json(run_dir / DONE_FILE, {
        "data": data_label(cell.data), "model": cell.model, "method": cell.method.value,
        "experts_per_domain": cell.experts_per_domain, "seed": cell.seed,
        "wauc": test["wauc"], "mean_auc": test["mean_auc"], "logloss": test["logloss"],
        "seconds": time.perf_counter() - start,
    })


def _settings(config: GridConfig) -> dict[str, Any]:
    """What every cell of a grid directory must share: training (but for the per-cell seed),
    tower and backend, with defaults resolved (a grid run under older defaults is refused rather
    than mixed): the protocol in force is recorded, not "default"."""
    train = replace(config.train, batch_mode=config.train.batches)
    return settings_record(train, config.backend, omit=("seed",), tower=config.tower or default_tower(config.train))


def _check_data(out: Path, data: DataConfig, dataset: MultiDomainDataset) -> None:
    """Refuse to mix data: the first run records each data setting's content fingerprint in
    ``data.json``; a later run whose data differ (another ``--data-dir`` holding other files, an
    edited raw file, another generator) is refused rather than averaged with the old cells. The
    same data moved to another folder is the same data."""
    path = out / DATA_FILE
    label = data_label(data)
    check_settings(path, {label: dataset_fingerprint(dataset)}, lambda keys: (
        f"grid directory {str(out)!r} holds cells of data setting {label!r} trained on other data (its "
        f"content fingerprint, recorded in {str(path)!r}, differs from the data loaded now); refusing to "
        "mix them: use another --out, or the data the grid was started with"), what="grid data record", grows=True)


def _check_settings(config: GridConfig) -> None:
    """Refuse to resume a grid directory with other training settings (its finished cells would
    be mixed with cells trained differently); the first run records them in ``grid.json``."""
    out = Path(config.out)
    path = out / GRID_SETTINGS
    check_settings(path, _settings(config), lambda keys: (
        f"grid directory {str(out)!r} was run with other settings ({', '.join(keys)}); "
        f"use another --out or the same settings (recorded in {str(path)!r})"))


def _finished(config: GridConfig) -> list[dict[str, Any]]:
    rows = []
    out = Path(config.out)
    for cell in plan_grid(config):
        path = cell.directory(out) / DONE_FILE
        if path.exists():
            row = read_json(path, "grid cell record")
            row["method_label"] = cell.method_label
            rows.append(row)
    return rows


def write_results(config: GridConfig) -> dict[str, Path]:
    """The tables and the plot from every finished cell of ``config`` (unfinished ones are absent).

    ``results.csv`` has one row per (data, backbone, method, k): ``wauc_mean``, ``wauc_std``
    (sample std over seeds), ``mean_auc_mean``, ``logloss_mean``, ``seeds`` and, for
    MoE-MLoRA, ``delta_vs_mlora``: its mean WAUC minus MLoRA's on the same data and backbone.
    """
    import pandas as pd

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = pd.DataFrame(_finished(config), columns=[
        "data", "model", "method", "experts_per_domain", "method_label", "seed",
        "wauc", "mean_auc", "logloss", "seconds",
    ])
    paths = {name: out / name for name in ("runs.csv", "results.csv", "results.md", "results.png")}
    write_frame(paths["runs.csv"], runs)
    summary = []
    for (data, model, label), group in runs.groupby(["data", "model", "method_label"], sort=False):
        wauc, wauc_std = mean_std(list(group["wauc"]))
        summary.append({
            "data": data, "model": model, "method": label,
            "experts_per_domain": int(group["experts_per_domain"].iloc[0]),
            "seeds": len(group), "wauc_mean": wauc, "wauc_std": wauc_std,
            "mean_auc_mean": mean_std(list(group["mean_auc"]))[0],
            "logloss_mean": mean_std(list(group["logloss"]))[0],
        })
    table = pd.DataFrame(summary, columns=[
        "data", "model", "method", "experts_per_domain", "seeds", "wauc_mean", "wauc_std",
        "mean_auc_mean", "logloss_mean",
    ])
    mlora = {(r.data, r.model): r.wauc_mean for r in table.itertuples() if r.method == "mlora"}
    table["delta_vs_mlora"] = [
        r.wauc_mean - mlora[(r.data, r.model)]
        if str(r.method).startswith("moe-mlora") and (r.data, r.model) in mlora else math.nan
        for r in table.itertuples()
    ]
    write_frame(paths["results.csv"], table)
    write_text(paths["results.md"], _markdown(table, config))
    _plot(paths["results.png"], table)
    return paths


def _methods_in_order(table: Any) -> list[str]:
    order = {"base": 0, "mlora": 1}
    return sorted(set(table["method"]), key=lambda m: (order.get(m, 2), m))


def _markdown(table: Any, config: GridConfig) -> str:
    train = config.train
    lines = [
        "# moefast grid: test WAUC",
        "",
        f"Mean ± sample standard deviation over seeds {', '.join(map(str, config.seeds))} "
        f"(n = seeds finished). Δ = MoE-MLoRA minus MLoRA mean WAUC, in WAUC points (x 100). "
        f"Training: max_epochs {train.max_epochs}, patience {train.patience}, batch {train.batch_size}, "
        f"lr {train.lr}, seeds_compat {getattr(train, 'seeds_compat', False)}.",
    ]
    for data, block in table.groupby("data", sort=False):
        methods = _methods_in_order(block)
        moe = [m for m in methods if m.startswith("moe-mlora")]
        lines += ["", f"## {data}", ""]
        lines.append("| backbone | " + " | ".join(methods) + " | " + " | ".join(f"Δ {m[len('moe-mlora-'):]}" for m in moe) + " |")
        lines.append("|---" * (1 + len(methods) + len(moe)) + "|")
        for model, rows in block.groupby("model", sort=False):
            by = {r.method: r for r in rows.itertuples()}
            cells = []
            for m in methods:
                r = by.get(m)
                if r is None or math.isnan(r.wauc_mean):
                    cells.append("")
                else:
                    std = "" if math.isnan(r.wauc_std) else f" ± {r.wauc_std:.4f}"
                    cells.append(f"{r.wauc_mean:.4f}{std} (n={r.seeds})")
            for m in moe:
                r = by.get(m)
                cells.append("" if r is None or math.isnan(r.delta_vs_mlora) else f"{100 * r.delta_vs_mlora:+.2f}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, table: Any) -> None:
    plt = pyplot()
    settings = list(dict.fromkeys(table["data"]))
    fig, axes = plt.subplots(len(settings) or 1, 1, figsize=(12, 3.5 * max(len(settings), 1)), squeeze=False)
    for ax, data in zip(axes[:, 0], settings, strict=False):
        block = table[table["data"] == data]
        backbones = list(dict.fromkeys(block["model"]))
        methods = _methods_in_order(block)
        width = 0.8 / max(len(methods), 1)
        values = []
        for k, method in enumerate(methods):
            rows = {r.model: r for r in block[block["method"] == method].itertuples()}
            means = [rows[b].wauc_mean if b in rows else math.nan for b in backbones]
            stds = [0.0 if b not in rows or math.isnan(rows[b].wauc_std) else rows[b].wauc_std for b in backbones]
            values += [v for v in means if not math.isnan(v)]
            ax.bar([i + k * width for i in range(len(backbones))], means, width, yerr=stds, label=method, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(backbones))], backbones)
        if values:
            ax.set_ylim(max(0.0, min(values) - 0.01), min(1.0, max(values) + 0.01))
        ax.set_ylabel("test WAUC")
        ax.set_title(str(data))
        ax.legend(fontsize="small", ncol=len(methods))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)

