"""Rebuilding a run directory's trained model (``moefast export`` / ``moefast predict``).

A finished run directory (``moefast train --out DIR`` or ``fit(..., out_dir=DIR)``) holds
``settings.json`` (backbone and tower among how the run started; ``config.json`` in runs of
older versions, still read), ``dataset.json`` (features, domain map, id
provenance: :mod:`moefast.runs.records`), ``metrics.json`` (written last: the run finished)
and ``checkpoints/NN_<stage>.pt``; the last stage's checkpoint holds the weights the test
predictions were made with. ``moefast train`` with several methods writes one such directory per
method under ``DIR``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moefast.config import GateInit, NumericSpec, TablePrecision, TowerConfig, TowerKind
from moefast.models.base import MODELS, CTRModel
from moefast.nn.embedding import EmbeddingCollection
from moefast.ops._backend import BackendLike
from moefast.reference.embedding_optim import FusedOptimizer, LazyAdam, RowwiseAdagrad
from moefast.runs.files import CHECKPOINTS, CONFIG_JSON, METRICS, SETTINGS
from moefast.runs.records import (
    DATASET_RECORD,
    dataset_record,
    features_from_record,
    read_dataset_record,
)
from moefast.runs.settings import read_json

__all__ = ["LoadedRun", "load_run", "method_dir", "tower_config_from_json"]


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run directory's trained model (eval mode, under the routing its test predictions used),
    the ``dataset.json`` record and the run's folder."""

    model: CTRModel
    record: dict[str, Any]
    path: Path
    checkpoint: Path


def method_dir(run_dir: str | Path, method: str | None = None) -> Path:
    """The folder of one method's run inside ``run_dir``: ``run_dir`` itself for a one-method
    run, ``run_dir/<method>`` for ``moefast train --method all``.

    ``ValueError`` naming the folder: not a run directory, or several methods and none (or an
    unknown one) chosen.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"run directory {str(root)!r} does not exist")
    if _is_run(root):
        if method is not None:
            recorded = _run_record(root)[1].get("kind")  # the tower's kind
            if recorded != method:
                raise ValueError(f"run directory {str(root)!r} holds method {recorded!r}, not {method!r}")
        return root
    methods = sorted(p.name for p in root.iterdir() if _is_run(p))
    if not methods:
        raise ValueError(f"{str(root)!r} is not a moefast run directory (no settings.json with its model, or "
                         "config.json, in it or in a method's subfolder)")
    if method is None:
        if len(methods) > 1:
            raise ValueError(f"run directory {str(root)!r} holds several methods ({', '.join(methods)}); "
                             "choose one with --method")
        method = methods[0]
    if method not in methods:
        raise ValueError(f"run directory {str(root)!r} has no method {method!r}; it holds {', '.join(methods)}")
    return root / method


def _is_run(folder: Path) -> bool:
    """A one-method run directory: its settings.json records a model (a grid's or the claims'
    record does not), or an older run's config.json."""
    if (folder / CONFIG_JSON).is_file():
        return True
    if (folder / SETTINGS).is_file():
        try:
            return "model" in read_json(folder / SETTINGS, "settings record", expect=dict)
        except ValueError:
            return True  # a damaged record: load_run names it
    return False


def _run_record(folder: Path) -> tuple[Any, dict[str, Any], str, Any]:
    """The model's name and tower options the run was started with, the file they came from and
    the domain count that file recorded: settings.json's ``model`` (the one record; the domains
    are dataset.json's alone), or an older run's config.json (which also recorded the count)."""
    if (folder / SETTINGS).is_file():
        settings = read_json(folder / SETTINGS, "settings record", expect=dict)
        model = settings.get("model")
        if isinstance(model, dict):
            return model.get("name"), dict(model.get("tower") or {}), str(folder / SETTINGS), None
    if not (folder / CONFIG_JSON).is_file():
        raise ValueError(f"run directory {str(folder)!r} records no model (settings.json without one, no config.json)")
    config = read_json(folder / CONFIG_JSON, "run configuration", expect=dict)
    return config.get("model"), dict(config.get("tower") or {}), str(folder / CONFIG_JSON), config.get("num_domains")


def tower_config_from_json(value: Mapping[str, Any], where: str) -> TowerConfig:
    """The :class:`TowerConfig` a run recorded (settings.json's ``model.tower``, or an older
    run's config.json ``tower``: enums by value, tuples as lists)."""
    fields = {f.name for f in dataclasses.fields(TowerConfig)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown tower setting(s) {unknown}")
    kwargs = dict(value)
    try:
        if "kind" in kwargs:
            kwargs["kind"] = TowerKind(kwargs["kind"])
        if "gate_init" in kwargs:
            kwargs["gate_init"] = GateInit(kwargs["gate_init"])
        for key in ("hidden_units", "ranks"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return TowerConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: the recorded tower is invalid: {exc}") from None


def _numeric_specs(record: Mapping[str, Any]) -> tuple[NumericSpec, ...]:
    return tuple(NumericSpec(str(entry["name"])) for entry in record["numeric"])


def load_run(
    run_dir: str | Path, method: str | None = None, *, dataset: Any = None, backend: BackendLike = None
) -> LoadedRun:
    """The trained model of a finished run directory.

    Args:
        run_dir: a run directory, or the top folder of a several-method run (then ``method``).
        method: ``base`` | ``mlora`` | ``moe-mlora`` when ``run_dir`` holds several.
        dataset: the run's dataset, used for its features and domains only when the run
            directory predates ``dataset.json``.
        backend: the model's layers' backend (default: auto).

    Raises:
        ValueError: naming the file: not a run directory, an unfinished run (no metrics.json),
            a missing or damaged record, or a checkpoint that does not match (see
            :func:`moefast.runs.checkpoint.load_checkpoint`).
    """
    from moefast.runs.checkpoint import load_checkpoint

    folder = method_dir(run_dir, method)
    if not (folder / METRICS).is_file():
        raise ValueError(f"run directory {str(folder)!r} has no metrics.json: the run did not finish")
    name, tower_json, source, recorded_domains = _run_record(folder)
    if name not in MODELS:
        raise ValueError(f"{source!r}: unknown model {name!r}")
    tower = tower_config_from_json(tower_json, source)
    if (folder / DATASET_RECORD).is_file():
        record = read_dataset_record(folder / DATASET_RECORD)
    elif dataset is not None:
        record = dataset_record(dataset)
    else:
        raise ValueError(f"run directory {str(folder)!r} has no {DATASET_RECORD} (written by newer "
                         "moefast runs): pass the run's data flags so its features can be read")
    features = features_from_record(record, str(folder / DATASET_RECORD))
    num_domains = len(record["domains"])
    if recorded_domains is not None and recorded_domains != num_domains:
        raise ValueError(f"{source!r} has {recorded_domains} domains, {DATASET_RECORD} {num_domains}")
    # The stages' checkpoints are NN_<label>.pt, numbered in training order.
    numbered = [(int(p.name.split("_", 1)[0]), p) for p in (folder / CHECKPOINTS).glob("*_*.pt")
                if p.name.split("_", 1)[0].isdigit()]
    checkpoints = [p for _, p in sorted(numbered)]
    if not checkpoints:
        raise ValueError(f"run directory {str(folder)!r} has no checkpoint under checkpoints/")
    model = MODELS[name](features, num_domains, tower, backend=backend, numeric=_numeric_specs(record))
    # The checkpoint holds the tables in the run's precision (metrics.json; float32 before half
    # tables existed): the model is converted to it explicitly, then loads strictly.
    precision = read_json(folder / METRICS, "run metrics", expect=dict).get("table_precision", TablePrecision.FP32.value)
    try:
        table_precision = TablePrecision(precision)
    except ValueError:
        raise ValueError(f"{str(folder / METRICS)!r}: unknown table_precision {precision!r}") from None
    # A fused embedding optimizer's state is in the checkpoint too (buffers): give the tables an
    # optimizer of the run's kind so that the state loads (its hyperparameters play no part).
    settings = folder / SETTINGS
    kind = (read_json(settings, "settings record", expect=dict).get("train") or {}).get("embedding_optimizer") if settings.is_file() else None
    fused: FusedOptimizer | None = (LazyAdam() if kind == "lazy-adam" else
                                    RowwiseAdagrad() if kind == "rowwise-adagrad" else None)
    for module in model.modules():
        if isinstance(module, EmbeddingCollection):
            module.set_precision(table_precision)
            if fused is not None:
                module.set_optimizer(fused)
    load_checkpoint(checkpoints[-1], model, dataset=str(record.get("name")))
    model.eval()
    return LoadedRun(model, record, folder, checkpoints[-1])
