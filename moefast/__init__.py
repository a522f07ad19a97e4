"""moefast: multi-domain CTR prediction with MLoRA and MoE-MLoRA, reference and fast paths.

Importing moefast never imports triton and never queries CUDA: the Triton kernels live in
``moefast.kernels`` and are imported lazily by the ops that launch them.
"""

from __future__ import annotations

from moefast import config, data, errors, export, models, nn, ops, reference, train
from moefast._version import __version__
from moefast.config import FeatureSpec, Pooling, TowerConfig, TowerKind, TrainConfig
from moefast.nn.convert import convert

__all__ = [
    "FeatureSpec",
    "Pooling",
    "TowerConfig",
    "TowerKind",
    "TrainConfig",
    "__version__",
    "config",
    "convert",
    "data",
    "errors",
    "export",
    "models",
    "nn",
    "ops",
    "reference",
    "train",
]
