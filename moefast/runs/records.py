"""``dataset.json``: what a run directory records about the data its model reads.

Written beside ``settings.json`` by every run (:func:`moefast.runs.rundir.write_run`) and copied
beside an exported program, it is plain JSON so that a service in any language can map its raw
values itself:

- ``features``: the categorical fields in the model's order (name, vocabulary size, embedding
  dim, pooling ``none`` / ``sum`` / ``mean``; a multi-valued field's ids are padded with 0);
- ``numeric``: the numeric fields in the order the model stacks them (empty when none);
- ``domains``: the domain map, ``[{"id": 0, "name": ...}, ...]``;
- ``source``: where the ids come from: the source name and, for the real-format loaders, the
  fingerprint of the raw files and options that numbered them (``id_map: "fingerprint"``). Those
  loaders number users and items from the files they read, so an id means the same raw value
  only for the same files: ``moefast predict`` refuses another fingerprint rather than remap
  silently. The tabular source maps raw values through the run's ``vocab.json``
  (``id_map: "vocabulary"``, with the SHA-256 of its content); synthetic ids are the
  generator's own (``id_map: "ids"``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moefast.config import FeatureSpec, Pooling
from moefast.runs.files import DATASET_RECORD
from moefast.runs.settings import read_json
from moefast.runs.writer import write_text

__all__ = ["DATASET_RECORD", "RECORD_FORMAT", "dataset_record", "features_from_record", "read_dataset_record",
           "vocabulary_digest", "write_dataset_record"]

RECORD_FORMAT = 1
# Sources whose ids are the data's own (no numbering from files).
_ID_SOURCES = ("synthetic",)


def dataset_record(dataset: Any) -> dict[str, Any]:
    """The JSON record of a :class:`~moefast.data.MultiDomainDataset` (see the module docstring)."""
    info: Mapping[str, Any] = dataset.info
    source = str(info.get("source", dataset.name))
    cache = info.get("cache")
    fingerprint = cache.get("key") if isinstance(cache, Mapping) else None
    vocabulary = vocabulary_digest(dataset)
    if source in _ID_SOURCES:
        id_map = "ids"
    elif vocabulary is not None:
        id_map = "vocabulary"  # the tabular source maps raw values through its saved vocab.json
    else:
        id_map = "fingerprint"
    return {
        "format": RECORD_FORMAT,
        "name": dataset.name,
        "source": {"name": source, "id_map": id_map, "fingerprint": fingerprint, "vocabulary": vocabulary},
        "features": [{"name": f.name, "vocab_size": f.vocab_size, "dim": f.dim, "pooling": f.pooling.value}
                     for f in dataset.features],
        "numeric": [{"name": s.name} for s in getattr(dataset, "numeric", ())],
        "pretrained": sorted(getattr(dataset, "pretrained", {}) or {}),
        "domains": [{"id": d, "name": str(n)} for d, n in enumerate(dataset.domain_names)],
    }


def vocabulary_digest(dataset: Any) -> str | None:
    """SHA-256 of the tabular source's vocabularies, statistics and domain map
    (``info["table"]``, the content of the run's ``vocab.json``) as canonical JSON; None for
    other sources."""
    artifacts = dataset.info.get("table")
    if not isinstance(artifacts, Mapping):
        return None
    text = json.dumps(artifacts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_dataset_record(path: Path, dataset: Any) -> None:
    write_text(path, json.dumps(dataset_record(dataset), indent=2) + "\n")


def read_dataset_record(path: Path) -> dict[str, Any]:
    """The record at ``path``, checked for its shape; ``ValueError`` naming the file otherwise."""
    record = read_json(path, "dataset record", expect=dict)
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{str(path)!r} is not a moefast dataset record (format {RECORD_FORMAT})")
    for key, kind in (("features", list), ("numeric", list), ("domains", list), ("source", dict)):
        if not isinstance(record.get(key), kind):
            raise ValueError(f"{str(path)!r} is damaged: {key!r} must be a {kind.__name__}")
    return record


def features_from_record(record: Mapping[str, Any], where: str) -> tuple[FeatureSpec, ...]:
    """The record's categorical fields as :class:`FeatureSpec` s; ``ValueError`` naming ``where``."""
    try:
        return tuple(FeatureSpec(str(f["name"]), int(f["vocab_size"]), int(f["dim"]), Pooling(f["pooling"]))
                     for f in record["features"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: a feature entry is damaged: {exc}") from None
