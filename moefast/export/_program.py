"""The exported program: a merged model as a ``torch.export`` program that needs no moefast.

:class:`ServingModule` is what gets exported. It runs the merged model's backbone with torch's
own ops only (DESIGN.md section 12): each field's lookup is ``torch.nn.functional.embedding``
(a multi-valued field: the rows of its non-padding ids summed or averaged), the backbone's own
``interaction_logit`` and ``tower_input``, then the :class:`~moefast.export.MergedTower`. moefast's
embedding op is not traced: its input checks read ids and sizes as Python ints, which would fix
the batch size of the program.

Inputs of the program, in order (recorded in the ``.json`` written beside it):

1. ``ids``: a dict, one entry per categorical field, int64 ``[B]`` (single-valued) or ``[B, L]``
   (multi-valued, padded on the right with id 0; ``L`` may differ between calls);
2. ``numeric``: float32 ``[B, n]``, the numeric fields in the recorded order (only when the
   model has numeric fields);
3. ``domain``: int64 ``[B]``, ids of the recorded domain map.

Output: float32 ``[B]`` **logits**; the click probability is ``sigmoid(logit)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moefast._version import __version__
from moefast.config import FeatureSpec, Pooling
from moefast.export._merge import MergedModel, MergedTower
from moefast.nn.embedding import EmbeddingCollection
from moefast.runs.writer import copy_file, write_at_path, write_text

__all__ = ["PROGRAM_FORMAT", "NumericServingModule", "ServingModule", "example_inputs", "export_onnx",
           "export_program", "onnx_missing", "program_inputs", "program_sha256", "serving_module"]

PROGRAM_FORMAT = 1
# torch.export specialises a dimension whose example size is 0 or 1: examples have at least 2 rows.
EXAMPLE_ROWS = 2


def _lookup(collection: EmbeddingCollection, ids: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``collection(ids)`` with torch's ops: float32 ``[B, sum of dims]``. Half tables stay
    half in the program; each looked-up row converts to float32 (exactly) before pooling, which
    accumulates in float32, as the engine's lookup does."""
    outs = []
    tables = collection.tables
    for spec in collection.features:
        table = tables[spec.name]
        field = ids[spec.name]
        rows = F.embedding(field, table).float()  # [B, dim] or [B, L, dim]
        if spec.pooling is Pooling.NONE:
            outs.append(rows)
            continue
        kept = (field != 0).to(rows.dtype)  # [B, L]: id 0 pads and is never pooled
        pooled = (rows * kept.unsqueeze(-1)).sum(dim=1)  # [B, dim]
        if spec.pooling is Pooling.MEAN:
            pooled = pooled / kept.sum(dim=1, keepdim=True).clamp(min=1.0)  # an empty bag stays 0
        outs.append(pooled)
    return torch.cat(outs, dim=1)


class ServingModule(nn.Module):
    """A :class:`MergedModel` with torch-only lookups and the program's flat signature.

    ``forward(ids, domain)`` (or ``forward(ids, numeric, domain)`` when the model has numeric
    fields; see the module docstring) -> logits float32 ``[B]``. It computes what the merged
    model computes: the composition of :meth:`moefast.models.CTRModel.forward`, with the lookups
    of :func:`_lookup` (``tests/test_export.py`` holds the two equal for every backbone).
    """

    def __init__(self, merged: MergedModel) -> None:
        super().__init__()
        if not isinstance(merged, MergedModel):
            raise TypeError(f"ServingModule wraps a MergedModel (moefast.export.merge), got {type(merged).__name__}")
        self.backbone = merged.backbone
        self.numeric_names = tuple(s.name for s in merged.numeric)
        self.eval()

    def features(self, ids: Mapping[str, torch.Tensor], numeric: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The backbone's ``features`` mapping: the ids, plus one float32 ``[B]`` column per
        numeric field."""
        features = dict(ids)
        if self.numeric_names:
            assert numeric is not None
            for k, name in enumerate(self.numeric_names):
                features[name] = numeric[:, k]
        return features

    def logits(self, ids: Mapping[str, torch.Tensor], numeric: torch.Tensor | None,
               domain: torch.Tensor) -> torch.Tensor:
        model = self.backbone
        features = self.features(ids, numeric)
        embedded = _lookup(model.embedding, features)  # [B, sum of dims]
        logit = model.interaction_logit(features, embedded)  # [B]
        if model.linear is not None:
            logit = logit + _lookup(model.linear.weights, features).sum(dim=1)
        tower_in = model.tower_input(embedded)
        if self.numeric_names:
            assert numeric is not None
            tower_in = torch.cat([tower_in, numeric], dim=1)  # [B, tower width]
            dense_linear = getattr(model, "dense_linear", None)
            if dense_linear is not None:
                logit = logit + dense_linear(numeric).squeeze(-1)
        tower = model.tower
        assert isinstance(tower, MergedTower)
        return logit + tower(tower_in, domain)

    def forward(self, ids: dict[str, torch.Tensor], domain: torch.Tensor) -> torch.Tensor:
        return self.logits(ids, None, domain)


class NumericServingModule(ServingModule):
    """:class:`ServingModule` of a model with numeric fields: ``forward(ids, numeric, domain)``."""

    def forward(self, ids: dict[str, torch.Tensor], numeric: torch.Tensor,  # type: ignore[override]
                domain: torch.Tensor) -> torch.Tensor:
        return self.logits(ids, numeric, domain)


def serving_module(merged: MergedModel) -> ServingModule:
    """The :class:`ServingModule` (or :class:`NumericServingModule`) of ``merged``."""
    return NumericServingModule(merged) if merged.numeric else ServingModule(merged)


def example_inputs(
    features: tuple[FeatureSpec, ...], numeric: int, num_domains: int, rows: int = EXAMPLE_ROWS, bag: int = 3
) -> tuple[Any, ...]:
    """Example arguments of :class:`ServingModule` with ``rows`` rows (every id 1 or 0: valid for
    any vocabulary; domains cycle through ``[0, D)``)."""
    ids = {f.name: (torch.ones(rows, bag, dtype=torch.int64) if f.multi_valued
                    else torch.zeros(rows, dtype=torch.int64)) for f in features}
    domain = torch.arange(rows, dtype=torch.int64) % num_domains
    if numeric:
        return (ids, torch.zeros(rows, numeric), domain)
    return (ids, domain)


def program_inputs(features: tuple[FeatureSpec, ...], numeric: tuple[str, ...]) -> list[dict[str, Any]]:
    """The documented inputs of the program, in call order (written to its ``.json``)."""
    fields = [{"name": f.name, "dtype": "int64", "shape": ["B", "L"] if f.multi_valued else ["B"],
               "vocab_size": f.vocab_size, "pooling": f.pooling.value,
               **({"padding_id": 0} if f.multi_valued else {})} for f in features]
    inputs: list[dict[str, Any]] = [{"name": "ids", "kind": "dict", "fields": fields}]
    if numeric:
        inputs.append({"name": "numeric", "dtype": "float32", "shape": ["B", len(numeric)], "columns": list(numeric)})
    inputs.append({"name": "domain", "dtype": "int64", "shape": ["B"]})
    return inputs


def _check_extra_files(extra_files: Mapping[str, Path]) -> None:
    """Each preprocessing entry's name stays inside ``<out stem>.preprocessing/`` (relative, no
    ``..``) and its source exists: ``ValueError`` naming the entry."""
    for name, src in extra_files.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"export_program: extra_files name {name!r} must be a relative path inside the "
                             "preprocessing folder (no '..', not absolute)")
        if not Path(src).exists():
            raise ValueError(f"export_program: extra_files {name!r}: the source {str(src)!r} does not exist")


def export_program(
    merged: MergedModel,
    out: str | os.PathLike[str],
    *,
    record: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    data_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``merged`` with ``torch.export`` (dynamic batch) to ``out`` (``.pt2``) and write the
    preprocessing beside it.

    Writes ``out``, ``<out>.json`` (format, torch and moefast versions, the inputs in call order,
    the output, the domain map, the features and their provenance from ``record``, a
    ``dataset.json`` record, and ``program_sha256``, the SHA-256 of ``out`` as written) and copies each of ``extra_files`` (name -> source path: the run's
    vocabularies and numeric statistics) into ``<out stem>.preprocessing/``. ``data_options``
    (the run's data flags) are recorded so that ``moefast predict`` can load the same data.
    Returns the ``.json`` payload.

    Raises:
        ValueError: ``out`` does not end in ``.pt2``.
    """
    if not isinstance(out, str | os.PathLike):
        raise TypeError(f"export_program: out must be a path, got {type(out).__name__}")
    dest = Path(out)
    if dest.suffix != ".pt2":
        raise ValueError(f"--out {str(dest)!r}: an exported program is a .pt2 file")
    if record is not None and not isinstance(record, Mapping):
        raise TypeError(f"export_program: record must be a dataset.json mapping, got {type(record).__name__}")
    _check_extra_files(extra_files or {})  # before anything is written: no half-made export
    serving = serving_module(merged)
    features = merged.features
    numeric = serving.numeric_names
    args, dims = _example_and_dims(merged)
    with torch.no_grad():
        program = torch.export.export(serving, args, dynamic_shapes=dims, strict=False)
    payload: dict[str, Any] = {
        "format": PROGRAM_FORMAT,
        "program": dest.name,
        "torch_version": torch.__version__,
        "moefast_version": __version__,
        "load": "torch.export.load(path).module()(*inputs)",
        "inputs": program_inputs(features, numeric),
        "output": {"name": "logit", "dtype": "float32", "shape": ["B"],
                   "meaning": "the click logit; probability = sigmoid(logit)"},
        "model": merged.name,
        # How the program stores its tables (fp32, or the run's own half precision); lookups
        # and everything after them compute in float32 either way.
        "table_precision": "/".join(sorted({m.precision.value for m in merged.modules()
                                            if isinstance(m, EmbeddingCollection)})),
        "domains": [{"id": d, "name": n} for d, n in enumerate(_domain_names(record, merged.num_domains))],
        "dataset": dict(record) if record is not None else None,
        "data_options": dict(data_options) if data_options is not None else None,
        "preprocessing": sorted(extra_files or {}),
    }
    text = json.dumps(payload, indent=2) + "\n"
    # Under its final name (the archive's folder is named after the file), by the one writer.
    write_at_path(dest, lambda tmp: torch.export.save(program, tmp, extra_files={"moefast.json": text}))
    # The sidecar alone carries the program's SHA-256 (the archive cannot hold its own digest):
    # moefast predict checks it before loading, as checkpoints are checked (docs/serving.md).
    payload["program_sha256"] = program_sha256(dest)
    write_text(dest.parent / f"{dest.name}.json", json.dumps(payload, indent=2) + "\n")
    if extra_files:  # in the payload above as names relative to the folder
        beside = dest.parent / f"{dest.stem}.preprocessing"
        for name, src in extra_files.items():
            source = Path(src)
            files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
            for file in files:
                copy_file(file, beside / name / file.relative_to(source) if source.is_dir() else beside / name)
    return payload


def program_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of the file ``path`` (hex), read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _example_and_dims(merged: MergedModel) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Example arguments (2 rows) and their dynamic shapes: the batch everywhere, each bag's width."""
    features = merged.features
    batch = torch.export.Dim("batch", min=1)
    args = example_inputs(features, len(merged.numeric), merged.num_domains)
    ids_dims = {f.name: ({0: batch, 1: torch.export.Dim(f"bag_{k}", min=1)} if f.multi_valued else {0: batch})
                for k, f in enumerate(features)}
    dims: tuple[Any, ...] = (ids_dims, {0: batch}, {0: batch}) if merged.numeric else (ids_dims, {0: batch})
    return args, dims


def onnx_missing() -> str | None:
    """Why ONNX export cannot run here (a package missing), or None."""
    import importlib.util

    for name in ("onnx", "onnxscript"):
        if importlib.util.find_spec(name) is None:
            return (f"ONNX export needs the onnx and onnxscript packages ({name} is missing: pip install "
                    "onnx onnxscript); the .pt2 program needs neither")
    return None


def export_onnx(merged: MergedModel, out: str | os.PathLike[str]) -> Path:
    """The same program as ONNX (``torch.onnx.export(..., dynamo=True)``), optional: it needs the
    ``onnx`` and ``onnxscript`` packages, which moefast does not depend on.

    Inputs are named ``ids_<field>``, ``numeric`` (when any) and ``domain``, with the dtypes and
    shapes of the ``.pt2`` program; the output is the logit. Checked with onnxruntime 1.32 at
    batch 1, 64 and 4096 (docs/serving.md).

    Raises:
        ValueError: ``out`` does not end in ``.onnx``, or the ONNX packages are missing.
    """
    dest = Path(out)
    if dest.suffix != ".onnx":
        raise ValueError(f"{str(dest)!r}: an ONNX model is a .onnx file")
    missing = onnx_missing()
    if missing is not None:
        raise ValueError(missing)
    args, dims = _example_and_dims(merged)
    with torch.no_grad():
        write_at_path(dest, lambda tmp: torch.onnx.export(serving_module(merged), args, str(tmp),
                                                          dynamic_shapes=dims, dynamo=True))
    return dest


def _domain_names(record: Mapping[str, Any] | None, num_domains: int) -> list[str]:
    if record is None:
        return [f"domain{d}" for d in range(num_domains)]
    return [str(d["name"]) for d in record["domains"]]
