"""The run directory of DESIGN.md section 5.

::

    <run>/config.json          the resolved model, tower and training configuration
    <run>/metrics.json         the schema of DESIGN.md section 5 (keys may be added, not renamed)
    <run>/predictions.csv      the test split: domain, label, score (probability)
    <run>/checkpoints/NN_<stage>.pt   one per stage, best weights, atomic
    <run>/val_auc.png          validation AUC per epoch, one line per stage
    <run>/per_domain_auc.png   test AUC per domain
    <run>/gate_weights.png     MoE-MLoRA only: gate weight of every expert for every domain

Predictions are ``CSV``; Parquet outputs come with the tabular source (pyarrow is a declared
dependency).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from moefast.config import TrainConfig
from moefast.data.dataset import MultiDomainDataset
from moefast.models.base import CTRModel

__all__ = ["RunResult", "plot_methods", "to_jsonable", "write_json", "write_run"]


class StageHistory(Protocol):
    """What the validation plot reads of one stage (``moefast.train.loop.StageRecord``)."""

    @property
    def label(self) -> str: ...

    @property
    def val_history(self) -> Sequence[float]: ...


class RunResult(Protocol):
    """What a run directory is written from (``moefast.train.loop.FitResult``, which imports
    this module: the run directory does not import the loop back)."""

    @property
    def metrics(self) -> Mapping[str, Any]: ...

    @property
    def stages(self) -> Sequence[StageHistory]: ...

    @property
    def test_logits(self) -> torch.Tensor: ...

    @property
    def gate_weights(self) -> torch.Tensor | None: ...


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, tuples and paths as plain JSON values."""
    if hasattr(value, "__dataclass_fields__"):
        return to_jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "value") and not isinstance(value, int | float | str | bool):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(payload), indent=2) + "\n")
    tmp.replace(path)


def write_run(
    run_dir: Path, result: RunResult, dataset: MultiDomainDataset, model: CTRModel, config: TrainConfig
) -> None:
    """Write everything but the checkpoints (which the stages wrote already)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / "config.json",
        {"dataset": dataset.name, "model": model.name, "tower": model.tower_config,
         "num_domains": dataset.num_domains, "train": config},
    )
    write_json(run_dir / "metrics.json", result.metrics)
    _write_predictions(run_dir / "predictions.csv", dataset, result.test_logits)
    _plot_val_history(run_dir / "val_auc.png", result)
    plot_methods(run_dir / "per_domain_auc.png", {result.metrics["method"]: result.metrics})
    if result.gate_weights is not None:
        _plot_gate(run_dir / "gate_weights.png", result.gate_weights, dataset.domain_names)


def _write_predictions(path: Path, dataset: MultiDomainDataset, logits: torch.Tensor) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "domain": dataset.test.domain.numpy(),
            "label": dataset.test.label.numpy().astype("int8"),
            "score": torch.sigmoid(logits.double()).numpy(),
        }
    )
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _plot_val_history(path: Path, result: RunResult) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    epoch0 = 0
    for record in result.stages:
        xs = list(range(epoch0 + 1, epoch0 + len(record.val_history) + 1))
        ax.plot(xs, record.val_history, marker="o", label=record.label)
        epoch0 += len(record.val_history)
    ax.set_xlabel("epoch (stages one after another)")
    ax.set_ylabel("validation AUC (early-stopping metric)")
    ax.set_title(f"{result.metrics['model']} / {result.metrics['method']}")
    if len(result.stages) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_gate(path: Path, gate: torch.Tensor, domain_names: Sequence[str]) -> None:
    plt = _pyplot()
    d, e = gate.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * e + 2), max(3.0, 0.4 * d + 1.5)))
    image = ax.imshow(gate.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xlabel(f"expert (expert i belongs to domain i % {d})")
    ax.set_ylabel("domain")
    ax.set_yticks(range(d), [str(n) for n in domain_names])
    ax.set_xticks(range(e))
    fig.colorbar(image, ax=ax, label="gate weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_methods(path: Path, metrics_by_method: Mapping[str, Mapping[str, Any]]) -> None:
    """Grouped bars: test AUC per domain, one bar per method (a null AUC draws no bar)."""
    plt = _pyplot()
    methods = list(metrics_by_method)
    first = metrics_by_method[methods[0]]["test"]["per_domain"]
    names = [str(row["name"]) for row in first]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.3 * len(names) * len(methods) + 3)), 4.5))
    lows = []
    for k, method in enumerate(methods):
        rows = metrics_by_method[method]["test"]["per_domain"]
        aucs = [math.nan if row["auc"] is None else row["auc"] for row in rows]
        lows += [a for a in aucs if not math.isnan(a)]
        ax.bar([i + k * width for i in range(len(rows))], aucs, width, label=method)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45, ha="right")
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.02), min(1.0, max(lows) + 0.01))
    ax.set_ylabel("test AUC")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
