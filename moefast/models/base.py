"""What every backbone shares: embeddings, an interaction part and the adapter tower.

A backbone computes ``logit = [linear(features) + dense_linear(x) +] interaction_logit(features,
e) + tower([tower_input(e), x], domain)`` where ``e = embedding(features)`` is the ``[B, sum of
dims]`` concatenation of all categorical fields, ``x`` the ``[B, n]`` numeric fields (none unless
the model was built with ``numeric`` specs) and ``linear`` / ``dense_linear`` the first-order
weights, present when the class sets ``first_order = True`` (``linear`` is looked up in the same
engine call as ``e``). A new backbone (AutoInt,
NFM, PNN, DCN, xDeepFM, FiBiNET) subclasses :class:`CTRModel`, builds its interaction modules
in ``__init__`` after ``super().__init__`` and overrides :meth:`CTRModel.interaction_logit` (and
:meth:`CTRModel.tower_input` if the tower does not read the plain embeddings), then registers
itself with :func:`register`.

Parameter groups used by the training stages:

- the tower's shared path, its adapters and its gate (``self.tower``);
- everything else (embeddings, first-order weights of ids and of numeric fields, interaction
  layers): ``backbone_parameters``;
- the pretrained fields' tables and first-order weights (``pretrained_parameters``), which the
  stages keep frozen unless the run fine-tunes them (``TrainConfig.pretrained``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, TypeVar

import torch
from torch import nn

from moefast.config import FeatureSpec, NumericSpec, TowerConfig
from moefast.models.linear import FirstOrder
from moefast.nn.embedding import EmbeddingCollection, embed_together
from moefast.nn.tower import Tower
from moefast.ops._backend import BackendLike
from moefast.precision import wide_linear

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
        numeric: the dataset's numeric fields (``MultiDomainDataset.numeric``), default none.

    Numeric features (the contract serving and every caller rely on): ``forward`` reads them
    from the same ``features`` mapping as the categorical ids, ``features[spec.name]`` float32
    ``[B]`` for each numeric spec (transformed and filled by the data source: finite). They are
    stacked in spec order into ``x`` ``[B, n]`` (:meth:`dense_input`) and concatenated after
    :meth:`tower_input`'s output, so the tower reads ``tower_in_features() + n`` columns
    (:attr:`tower_width`); backbones with ``first_order`` add ``dense_linear(x)``, a bias-free
    ``Linear(n, 1)`` initialised ``N(0, 1e-4^2)`` like DeepCTR-Torch's dense weights. The
    interaction parts (FM, cross, CIN, attention...) read only the embeddings, as in
    DeepCTR-Torch. Keys of ``features`` that name no field are ignored.
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
        numeric: Sequence[NumericSpec] = (),
    ) -> None:
        super().__init__()
        if not features:
            raise ValueError(f"{type(self).__name__} needs at least one feature")
        self.features = tuple(features)
        self.numeric = tuple(numeric)
        names = [f.name for f in self.features] + [s.name for s in self.numeric]
        if len(set(names)) != len(names):
            raise ValueError(f"{type(self).__name__}: duplicate field names {names}")
        self.num_domains = num_domains
        self.tower_config = tower
        self.embedding = EmbeddingCollection(self.features, init_std=EMBEDDING_INIT_STD, backend=backend)
        self.tower = Tower(self.tower_width, tower, num_domains, backend=backend)
        self.linear = (
            FirstOrder(self.features, init_std=EMBEDDING_INIT_STD, backend=backend) if self.first_order else None
        )
        self.dense_linear: nn.Linear | None = None
        if self.first_order and self.numeric:
            self.dense_linear = nn.Linear(len(self.numeric), 1, bias=False)
            nn.init.normal_(self.dense_linear.weight, std=EMBEDDING_INIT_STD)
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

    @property
    def tower_width(self) -> int:
        """Columns the tower reads: :meth:`tower_in_features` plus one per numeric field."""
        return self.tower_in_features() + len(self.numeric)

    def dense_input(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The numeric fields stacked in spec order, float32 ``[B, n]``; ``None`` without any.

        ``KeyError`` naming a numeric field missing from ``features``; ``ValueError`` for one
        that is not a float32 ``[B]`` tensor.
        """
        if not self.numeric:
            return None
        columns = []
        for spec in self.numeric:
            if spec.name not in features:
                raise KeyError(f"{type(self).__name__}: numeric feature {spec.name!r} missing from the batch")
            col = features[spec.name]
            if col.dtype != torch.float32 or col.dim() != 1:
                raise ValueError(
                    f"{type(self).__name__}: numeric feature {spec.name!r} must be float32 [B], "
                    f"got {col.dtype} {tuple(col.shape)}"
                )
            columns.append(col)
        return torch.stack(columns, dim=1)  # [B, n]

    def tower_input(self, embedded: torch.Tensor) -> torch.Tensor:
        """``[B, embedding_width]`` -> the tower input ``[B, tower_in_features()]``."""
        return embedded

    def interaction_logit(
        self, features: Mapping[str, torch.Tensor], embedded: torch.Tensor
    ) -> torch.Tensor:
        """The non-tower part's logit ``[B]`` (zero for a plain DNN)."""
        return embedded.new_zeros(embedded.shape[0])

    def forward(self, features: Mapping[str, torch.Tensor], domain: torch.Tensor) -> torch.Tensor:
        """``features[name]`` int64 ``[B]`` or ``[B, L]`` per categorical field, float32 ``[B]``
        per numeric field; ``domain`` int64 ``[B]`` -> logits float32 ``[B]``."""
        if self.linear is None:
            embedded = self.embedding(features)  # [B, sum of dims]
            logit = self.interaction_logit(features, embedded)
        else:
            embedded, weights = embed_together([self.embedding, self.linear.weights], features)
            logit = weights.sum(dim=1) + self.interaction_logit(features, embedded)
        tower_in = self.tower_input(embedded)  # [B, tower_in_features()]
        dense = self.dense_input(features)
        if dense is not None:
            tower_in = torch.cat([tower_in, dense], dim=1)  # [B, tower_width]
            if self.dense_linear is not None:
                logit = logit + wide_linear(dense, self.dense_linear).squeeze(-1)
        return logit + self.tower(tower_in, domain)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the tower: embeddings, first-order weights, interactions."""
        return [p for name, p in self.named_parameters() if not name.startswith("tower.")]

    def regularized_parameters(self) -> list[nn.Parameter]:
        """The tensors under the L2 penalty: embedding tables and first-order weights."""
        linear = list(self.linear.parameters()) if self.linear is not None else []
        dense = list(self.dense_linear.parameters()) if self.dense_linear is not None else []
        return [*self.embedding.parameters(), *linear, *dense]


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
