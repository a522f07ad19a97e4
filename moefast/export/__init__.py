"""moefast.export: serving a trained model (DESIGN.md section 12).

- :func:`merge` folds a trained MLoRA / MoE-MLoRA tower into per-domain ``[D, in, out]`` weights:
  a plain inference module that costs what the base model costs;
- :func:`export_program` writes it as a ``torch.export`` program (``.pt2``) that loads with
  plain PyTorch, with its inputs, output and preprocessing (feature specs, domain map,
  vocabularies) written beside it;
- :func:`load_run` (from :mod:`moefast.runs.read`) rebuilds the trained model of a run directory.

See docs/serving.md.

Owns: the merge, the exported program and its sidecar. Never imports: training, experiments
or the command line (a run directory is read back by :mod:`moefast.runs.read`).
"""

from __future__ import annotations

from moefast.export._merge import MergedModel, MergedTower, domain_mixture, merge, merge_tower
from moefast.export._program import ServingModule, export_onnx, export_program, serving_module
from moefast.runs.read import LoadedRun, load_run, method_dir
from moefast.runs.records import dataset_record

__all__ = [
    "LoadedRun",
    "MergedModel",
    "MergedTower",
    "ServingModule",
    "dataset_record",
    "domain_mixture",
    "export_onnx",
    "export_program",
    "load_run",
    "merge",
    "merge_tower",
    "method_dir",
    "serving_module",
]
