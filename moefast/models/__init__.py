"""moefast.models: CTR backbones with base, MLoRA and MoE-MLoRA towers.

``build(name, dataset, tower=...)`` is the entry point; backbones register themselves in
:data:`MODELS` (see :mod:`moefast.models.base` for how a new one drops in).

Owns: the backbones and the tower a model carries. Never imports: training, run directories,
experiments, export or the command line.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moefast.config import TowerConfig, TowerKind
from moefast.data.dataset import MultiDomainDataset
from moefast.data.stream import StreamedDataset
from moefast.models.alpha import ALPHA, alpha_for
from moefast.models.autoint import AutoInt
from moefast.models.base import MODELS, CTRModel, register
from moefast.models.dcn import DCN
from moefast.models.deepfm import DeepFM
from moefast.models.fibinet import FiBiNET
from moefast.models.nfm import NFM
from moefast.models.pnn import PNN
from moefast.models.wdl import WDL
from moefast.models.xdeepfm import XDeepFM
from moefast.ops._backend import BackendLike

__all__ = [
    "ALPHA",
    "DCN",
    "MODELS",
    "NFM",
    "PNN",
    "WDL",
    "AutoInt",
    "CTRModel",
    "DeepFM",
    "FiBiNET",
    "XDeepFM",
    "alpha_for",
    "build",
    "register",
]

# The seeds initialise layers after torch.manual_seed(1024).
DEFAULT_MODEL_SEED = 1024


def build(
    name: str,
    dataset: MultiDomainDataset | StreamedDataset,
    tower: TowerKind | str = TowerKind.BASE,
    *,
    experts_per_domain: int = 1,
    tower_config: TowerConfig | None = None,
    seed: int = DEFAULT_MODEL_SEED,
    backend: BackendLike = None,
) -> CTRModel:
    """A backbone for ``dataset`` with a base, MLoRA or MoE-MLoRA tower.

    Args:
        name: backbone (``deepfm``, ``wdl``, ...; see :data:`MODELS`).
        dataset: gives the features, their dims, the numeric fields and the number of domains ``D``.
        tower: ``"base"`` | ``"mlora"`` | ``"moe-mlora"`` (or a :class:`TowerKind`).
        experts_per_domain: MoE-MLoRA's ``E / D``.
        tower_config: everything else about the tower (units, dropout, alpha or ranks); an
            ``alpha`` of ``None`` (the default) takes the seeds' table entry for this backbone
            and dataset. Its ``kind`` and ``experts_per_domain`` are overridden by the
            arguments above.
        seed: the initial weights are drawn under this seed (the global RNG is left untouched).
        backend: passed to the layers (``reference`` | ``fast`` | ``auto``).

    The dataset's pretrained tables (``dataset.pretrained``) are loaded into the embeddings
    (:meth:`CTRModel.load_pretrained`); whether they train is the run's choice
    (``TrainConfig.pretrained``), frozen by default.
    """
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    try:
        kind = tower if isinstance(tower, TowerKind) else TowerKind(str(tower).lower())
    except ValueError:
        choices = ", ".join(k.value for k in TowerKind)
        raise ValueError(f"unknown tower {tower!r}; choose one of {choices}") from None
    base = tower_config or TowerConfig()
    config = replace(base, kind=kind, experts_per_domain=experts_per_domain)
    if config.ranks is None and config.alpha is None:
        config = replace(config, alpha=alpha_for(key, dataset.name))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[key](dataset.features, dataset.num_domains, config, backend=backend,
                            numeric=dataset.numeric)
    if dataset.pretrained:
        model.load_pretrained(dataset.pretrained)
    return model
