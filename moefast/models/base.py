"""What every backbone shares: embeddings, an interaction part and the adapter tower.

A backbone computes ``logit = [linear(features) +] interaction_logit(features, e) +
tower(tower_input(e), domain)`` where ``e = embedding(features)`` is the ``[B, sum of dims]``
concatenation of all fields and ``linear`` the first-order weights, present when the class sets
``first_order = True`` (looked up in the same engine call as ``e``). A new backbone (AutoInt,
NFM, PNN, DCN, xDeepFM, FiBiNET) subclasses :class:`CTRModel`, builds its interaction modules
in ``__init__`` after ``super().__init__`` and overrides :meth:`CTRModel.interaction_logit` (and
:meth:`CTRModel.tower_input` if the tower does not read the plain embeddings), then registers
itself with :func:`register`.

Parameter groups used by the training stages:

- the tower's shared path, its adapters and its gate (``self.tower``);
- everything else (embeddings, first-order weights, interaction layers): ``backbone_parameters``;
- the pretrained fields' tables and first-order weights (``pretrained_parameters``), which the
  stages keep frozen unless the run fine-tunes them (``TrainConfig.pretrained``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, TypeVar

import torch
from torch import nn

from moefast.config import FeatureSpec, TowerConfig
from moefast.models.linear import FirstOrder
from moefast.nn.embedding import EmbeddingCollection, embed_together
from moefast.nn.tower import Tower
from moefast.ops._backend import BackendLike

__all__ = ["MODELS", "CTRModel", "register"]

# DeepCTR-Torch (which the seeds' code builds on) initialises embeddings N(0, 1e-4^2).
EMBEDDING_INIT_STD = 1e-4


class CTRModel(nn.Module):
    """Base class of the backbones.

    Args:
        features: the dataset's categorical fields (their dims are the embedding dims).
        num_domains: ``D``.
        tower: the tower's configuration (its ``kind`` chooses base / MLoRA / MoE-MLoRA).
        backend: passed to every moefast layer (``reference`` | ``fast`` | ``auto``).
    """

    name: ClassVar[str] = ""
    # Whether the model has first-order (wide / linear) weights, ``self.linear``.
    first_order: ClassVar[bool] = False

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        num_domains: int,
        tower: TowerConfig,
        *,
        backend: BackendLike = None,
    ) -> None:
        super().__init__()
        if not features:
            raise ValueError(f"{type(self).__name__} needs at least one feature")
        self.features = tuple(features)
        self.num_domains = num_domains
        self.tower_config = tower
        self.embedding = EmbeddingCollection(self.features, init_std=EMBEDDING_INIT_STD, backend=backend)
        self.tower = Tower(self.tower_in_features(), tower, num_domains, backend=backend)
        self.linear = (
            FirstOrder(self.features, init_std=EMBEDDING_INIT_STD, backend=backend) if self.first_order else None
        )
        # Fields whose tables were loaded by :meth:`load_pretrained`, in feature order.
        self.pretrained_fields: tuple[str, ...] = ()

    def load_pretrained(self, tables: Mapping[str, torch.Tensor]) -> None:
        """Copy pretrained tables (``{field: float32 [vocab_size, dim]}``) into the embeddings.

        The field's first-order weight (backbones with one) is set to zero: the seeds' TF
        DeepCTR gives first-order weights a zeros initialiser and the field's ``trainable`` flag,
        so a frozen pretrained field's first-order weights stay zero in every stage.
        ``ValueError`` for an unknown field, a wrong vocabulary or dim, or a non-finite value.
        """
        from moefast.data.dataset import check_pretrained_table

        by_name = {f.name: f for f in self.features}
        for name, table in tables.items():
            check_pretrained_table(by_name.get(name), name, table, f"{type(self).__name__}.load_pretrained")
        with torch.no_grad():
            for name, table in tables.items():
                self.embedding.tables[name].copy_(table)
                if self.linear is not None:
                    self.linear.weights.tables[name].zero_()
        loaded = set(self.pretrained_fields) | set(tables)
        self.pretrained_fields = tuple(f.name for f in self.features if f.name in loaded)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The pretrained fields' embedding tables and first-order weights."""
        params = [self.embedding.tables[name] for name in self.pretrained_fields]
        if self.linear is not None:
            params += [self.linear.weights.tables[name] for name in self.pretrained_fields]
        return params

    @property
    def embedding_width(self) -> int:
        """Width of ``embedding(features)``: the sum of the field dims."""
        return sum(f.dim for f in self.features)

    def tower_in_features(self) -> int:
        """Width of :meth:`tower_input`'s output (override together with it)."""
        return self.embedding_width

    def tower_input(self, embedded: torch.Tensor) -> torch.Tensor:
        """``[B, embedding_width]`` -> the tower input ``[B, tower_in_features()]``."""
        return embedded

    def interaction_logit(
        self, features: Mapping[str, torch.Tensor], embedded: torch.Tensor
    ) -> torch.Tensor:
        """The non-tower part's logit ``[B]`` (zero for a plain DNN)."""
        return embedded.new_zeros(embedded.shape[0])

    def forward(self, features: Mapping[str, torch.Tensor], domain: torch.Tensor) -> torch.Tensor:
        """``features[name]`` int64 ``[B]`` or ``[B, L]``, ``domain`` int64 ``[B]`` -> logits float32 ``[B]``."""
        if self.linear is None:
            embedded = self.embedding(features)  # [B, sum of dims]
            logit = self.interaction_logit(features, embedded)
        else:
            embedded, weights = embed_together([self.embedding, self.linear.weights], features)
            logit = weights.sum(dim=1) + self.interaction_logit(features, embedded)
        return logit + self.tower(self.tower_input(embedded), domain)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the tower: embeddings, first-order weights, interactions."""
        return [p for name, p in self.named_parameters() if not name.startswith("tower.")]

    def regularized_parameters(self) -> list[nn.Parameter]:
        """The tensors under the L2 penalty: embedding tables and first-order weights."""
        linear = list(self.linear.parameters()) if self.linear is not None else []
        return [*self.embedding.parameters(), *linear]


M = TypeVar("M", bound=type[CTRModel])

MODELS: dict[str, type[CTRModel]] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator adding a backbone to :data:`MODELS` under ``name``."""

    def add(cls: M) -> M:
        if name in MODELS:
            raise ValueError(f"backbone {name!r} registered twice")
        cls.name = name
        MODELS[name] = cls
        return cls

    return add
