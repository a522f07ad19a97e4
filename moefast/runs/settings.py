"""The settings record: how a run, a grid or a claims plan was started, built and compared once.

Each thing that can be continued records, the first time it starts, what its continuation must
share with it, and refuses a continuation that differs, naming the keys:

::

    <run>/settings.json               a run directory (fit: data fingerprint, model, backend, training)
    <grid>/grid.json                  a grid directory (training, tower, backend every cell shares)
    <out>/claims-settings.json        a claims CSV (what the plan does not vary, the CSV's format)

:func:`settings_record` builds every one of them, :func:`check_settings` records or compares
them (``--resume``'s check of the command line's ``config.toml`` uses the same comparison,
:func:`differing_keys`), and :func:`to_jsonable` is the one way a configuration becomes JSON
(``metrics.json`` and the records above).

Records written before this module are read and accepted as they are: their shape is unchanged,
and the one value older code normalised three ways, ``backend``, is normalised on both sides
before comparing (a grid recorded ``null`` for "the environment's, else auto", the claims
``"auto"``, a run the environment variable's raw text; :func:`backend_name`).

:func:`dataset_settings` is the record's ``dataset`` group (a run's data, by content), and
:func:`dataset_fingerprint` a dataset's content fingerprint (the grid's ``data.json`` records one
per data setting, compared through :func:`check_settings` too).

Never imports: training, experiments, the command line (only configuration, the file names and the
writer).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moefast.config import TrainConfig
from moefast.ops._backend import BackendLike, requested_backend
from moefast.runs.files import SETTINGS
from moefast.runs.writer import read_json, write_text

if TYPE_CHECKING:
    from moefast.data.dataset import MultiDomainDataset

__all__ = [
    "CLAIMS_SETTINGS",
    "GRID_SETTINGS",
    "RUN_SETTINGS",
    "backend_name",
    "check_settings",
    "dataset_fingerprint",
    "dataset_settings",
    "differing_keys",
    "read_json",
    "settings_record",
    "to_jsonable",
]

RUN_SETTINGS = SETTINGS
GRID_SETTINGS = "grid.json"
CLAIMS_SETTINGS = "claims-settings.json"

# Training options that change no result: never part of a record.
_DISPLAY_ONLY = ("progress",)


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, tuples and paths as plain JSON values (NaN as ``null``)."""
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


def _hash_tensors(h: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def dataset_fingerprint(dataset: MultiDomainDataset) -> str:
    """SHA-256 of a dataset's content: its name, features, domains and every split's tensors and
    pretrained table (not where it was read from: the same data in another folder is the same
    data, other data under the same path is not)."""
    h = hashlib.sha256()
    header = {"name": dataset.name, "features": dataset.features, "numeric": dataset.numeric,
              "domains": dataset.domain_names}
    h.update(json.dumps(to_jsonable(header), sort_keys=True).encode() + b"\0")
    for split_name in ("train", "val", "test"):
        split = getattr(dataset, split_name)
        _hash_tensors(h, {f"{split_name}.{k}": v for k, v in split.features.items()}
                      | {f"{split_name}.domain": split.domain, f"{split_name}.label": split.label})
    _hash_tensors(h, {f"pretrained.{k}": v for k, v in dataset.pretrained.items()})
    return h.hexdigest()


def dataset_settings(dataset: Any, shards: int | None = None) -> dict[str, Any]:
    """The data a run's continuation must share with it (``settings.json``'s ``dataset``): the
    name and :func:`dataset_fingerprint` of a dataset in memory; for a streamed log
    (:class:`moefast.data.stream.StreamedDataset`, read as ``shards`` shards), the SHA-256 of its
    first pass (vocabularies, statistics, domains and the fingerprint of its file list: hashing
    the content of a log larger than memory is no option) and how it is read where that changes
    results: the shuffle buffer, the row groups' order and the shards."""
    if not dataset.info.get("stream"):
        return {"name": dataset.name, "fingerprint": dataset_fingerprint(dataset)}
    record = {"name": dataset.name, "features": dataset.features, "numeric": dataset.numeric,
              "domains": dataset.domain_names, "first_pass": dataset.artifacts}
    text = json.dumps(to_jsonable(record), sort_keys=True, ensure_ascii=False, default=str)
    h = hashlib.sha256(text.encode())
    _hash_tensors(h, {f"pretrained.{k}": v for k, v in dataset.pretrained.items()})
    return {"name": dataset.name, "fingerprint": h.hexdigest(), "shuffle_rows": dataset.shuffle_rows,
            "fragment_order": dataset.fragment_order, "shards": shards}


def backend_name(backend: BackendLike) -> str:
    """The backend a run asks for, by name: the explicit one, else ``MOEFAST_BACKEND``, else
    ``auto`` (what every layer then resolves per call; ``ValueError`` naming a bad value)."""
    return requested_backend(backend).value


def settings_record(train: TrainConfig, backend: BackendLike, *, omit: Iterable[str] = (), **groups: Any) -> dict[str, Any]:
    """The settings record of a run, a grid or a claims plan, as plain JSON values.

    Args:
        train: the training options; recorded without ``progress`` (it changes no result) and
            without the keys in ``omit`` (what a grid or a plan varies from run to run).
        backend: recorded by :func:`backend_name`.
        groups: the other groups of the record (``dataset``, ``model``, ``tower``, ``format``,
            ...), each as :func:`to_jsonable` writes it.
    """
    left_out = {*_DISPLAY_ONLY, *omit}
    record = {name: to_jsonable(value) for name, value in groups.items()}
    record["backend"] = backend_name(backend)
    record["train"] = {k: v for k, v in to_jsonable(train).items() if k not in left_out}
    return record


def differing_keys(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two settings records: ``group.key`` inside a group
    that is a dict on both sides, the group's name otherwise (one level deep, in ``current``'s
    order, then the groups only ``recorded`` has). ``backend`` is compared by :func:`backend_name`
    on both sides (records written before it hold ``null`` or the raw text)."""
    recorded, current = _comparable(recorded), _comparable(current)
    keys: list[str] = []
    for group in list(current) + [g for g in recorded if g not in current]:
        new, old = current.get(group), recorded.get(group)
        if isinstance(new, Mapping) and isinstance(old, Mapping):
            keys += [f"{group}.{k}" for k in list(new) + sorted(set(old) - set(new)) if new.get(k) != old.get(k)]
        elif new != old:
            keys.append(group)
    return keys


def _comparable(record: Mapping[str, Any]) -> Mapping[str, Any]:
    if "backend" not in record:
        return record
    try:
        return {**record, "backend": backend_name(record["backend"])}
    except ValueError:  # not a backend name: compared as written (and so refused)
        return record


def check_settings(
    path: Path,
    settings: Mapping[str, Any],
    refusal: Callable[[list[str]], str],
    *,
    record: bool = True,
    what: str = "settings record",
    grows: bool = False,
) -> None:
    """Record ``settings`` in ``path`` the first time (unless not ``record``: a reader only
    compares); afterwards refuse different ones.

    ``grows``: the record holds one entry per key, and later runs add keys of their own (the
    grid's ``data.json``: a content fingerprint per data setting): only the keys both hold are
    compared, and the keys new to the record are added to it.

    Raises:
        ValueError: ``refusal(keys)``, with the keys that differ (:func:`differing_keys`), or a
            damaged record naming the file and ``what`` it is.
    """
    current = to_jsonable(settings)
    if path.exists():
        recorded = read_json(path, what, expect=dict)
        if grows:
            keys = differing_keys({k: v for k, v in recorded.items() if k in current},
                                  {k: v for k, v in current.items() if k in recorded})
        else:
            keys = differing_keys(recorded, current)
        if keys:
            raise ValueError(refusal(keys))
        if not grows or set(current) <= set(recorded):
            return
        current = {**recorded, **current}
    if record:
        write_text(path, json.dumps(current, indent=1, sort_keys=True) + "\n")


