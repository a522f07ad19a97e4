"""Frozen configuration dataclasses shared by data, models, training and the CLI."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "SYNTHETIC_OPTIONS",
    "BatchMode",
    "DataConfig",
    "EmbeddingOptimizer",
    "ExpertStopRule",
    "FeatureSpec",
    "GateInit",
    "MLoRAMode",
    "NumericSpec",
    "Pooling",
    "Precision",
    "PretrainedMode",
    "RunConfig",
    "SeedsGate",
    "TablePrecision",
    "TowerConfig",
    "TowerKind",
    "TrainConfig",
    "default_tower",
]


class Pooling(enum.Enum):
    """How a field's ids become one vector per sample.

    ``NONE`` is a single-valued field (exactly one id per sample, a plain gather); ``SUM`` and
    ``MEAN`` pool a multi-valued field's bag of ids (an empty bag gives a zero vector).
    """

    NONE = "none"
    SUM = "sum"
    MEAN = "mean"


@dataclass(frozen=True)
class FeatureSpec:
    """One categorical field: its name, vocabulary size, embedding dim and pooling.

    Ids are contiguous in ``[0, vocab_size)``; id 0 is reserved for unknown/padding where a
    source needs one.
    """

    name: str
    vocab_size: int
    dim: int
    pooling: Pooling = Pooling.NONE

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("FeatureSpec.name must be a non-empty string")
        if self.vocab_size < 1:
            raise ValueError(f"feature {self.name!r}: vocab_size must be >= 1, got {self.vocab_size}")
        if self.dim < 1:
            raise ValueError(f"feature {self.name!r}: dim must be >= 1, got {self.dim}")
        if not isinstance(self.pooling, Pooling):
            raise TypeError(f"feature {self.name!r}: pooling must be a Pooling, got {self.pooling!r}")

    @property
    def multi_valued(self) -> bool:
        return self.pooling is not Pooling.NONE


@dataclass(frozen=True)
class NumericSpec:
    """One numeric (dense) field: its name.

    A numeric field travels in the same ``features`` mapping as the categorical ones, as
    float32 ``[B]`` (already transformed and filled: finite). A model concatenates its numeric
    fields, in spec order, to the tower input and, where the backbone has first-order weights,
    adds a bias-free ``Linear(n, 1)`` of them to the logit (DeepCTR-Torch's dense features).
    """

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"NumericSpec.name must be a non-empty string, got {self.name!r}")


# --------------------------------------------------------------------------------------------
# Towers, models and training (DESIGN.md section 2). The CLI and its TOML file map onto these.
# --------------------------------------------------------------------------------------------


class TowerKind(enum.Enum):
    """Which DNN tower a backbone carries.

    ``BASE`` is the plain tower; ``MLORA`` adds one LoRA adapter per domain to every hidden
    layer; ``MOE_MLORA`` adds ``experts_per_domain * D`` LoRA experts per layer, mixed by a gate
    that sees the domain id.
    """

    BASE = "base"
    MLORA = "mlora"
    MOE_MLORA = "moe-mlora"


class BatchMode(enum.Enum):
    """How training batches are drawn.

    ``SINGLE_DOMAIN`` (the method's and the seeds' protocol; moefast's under ``seeds_compat``):
    every batch holds one domain; each epoch shuffles the order of domains and runs each domain's
    batches in turn. ``MIXED`` (moefast's default, from the claims' evidence): batches mix
    domains and each sample is routed by its own domain id. A MoE-MLoRA expert stage trains on
    its own domain under either.
    """

    SINGLE_DOMAIN = "single-domain"
    MIXED = "mixed"


class ExpertStopRule(enum.Enum):
    """What expert ``i``'s stage early-stops on.

    ``OWN_DOMAIN``: the validation AUC of its own domain ``i % D``.
    ``OWN_DOMAIN_LOSS``: the validation logloss of its own domain (lower is better; the stage
    keeps the weights of its lowest loss). On a small domain (1k to 5k validation rows) the loss
    moves smoothly where the AUC of a rank-1 expert jumps from one validation to the next.
    ``ALL_DOMAINS`` (the seeds' code): the mean validation AUC over all domains, with expert
    ``i`` applied to every domain.
    """

    OWN_DOMAIN = "own-domain"
    OWN_DOMAIN_LOSS = "own-domain-loss"
    ALL_DOMAINS = "all-domains"


class SeedsGate(enum.Enum):
    """Under ``seeds_compat``, what the gate's weights do (docs/method.md, "The seeds' code as
    it runs"). The seeds build the gate's ``Dense`` in ``MloraMoE.build`` and its
    ``Embedding(D, 4)`` inside ``MloraMoE.call``; TF 1.12's Keras collects neither into the
    model's trainable weights, but a later TF 1.x tracks a sub-layer assigned as an attribute.

    ``FROZEN`` (the default; TF 1.12 as the seeds pin it, read line by line): the gate never
    trains and stays bitwise at its Keras start. ``GATE_STAGE`` (a later TF 1.x): the gate's
    ``Dense`` (moefast's ``gate.linear``) trains in the gate stage only, the layer-level
    ``trainable`` flag the seeds set per stage then being honoured; the domain table still never
    trains.
    """

    FROZEN = "frozen"
    GATE_STAGE = "gate-stage"


class MLoRAMode(enum.Enum):
    """How an MLoRA model trains: ``JOINT`` (the method: shared and adapter weights together,
    from scratch, one stage) or ``PRETRAIN_FREEZE`` (train the shared model first, then only the
    adapters on the frozen backbone)."""

    JOINT = "joint"
    PRETRAIN_FREEZE = "pretrain-freeze"


class EmbeddingOptimizer(enum.Enum):
    """What updates the embedding tables. The three are different algorithms, chosen explicitly.

    ``ADAM`` (the method's default): the tables join the stage's dense ``torch.optim.Adam``, so
    every row moves every step (its moments decay even for rows not in the batch).
    ``LAZY_ADAM`` / ``ROWWISE_ADAGRAD``: a sparse optimizer fused into the embedding backward
    (the C++ engine on the fast path, :mod:`moefast.reference.embedding_optim` on the reference
    path) that touches only the rows of the batch; for production-size tables. The L2 penalty
    then leaves the tables out (a dense penalty would touch every row).
    """

    ADAM = "adam"
    LAZY_ADAM = "lazy-adam"
    ROWWISE_ADAGRAD = "rowwise-adagrad"


class TablePrecision(enum.Enum):
    """How embedding tables are stored. ``FP32`` (the default) is bitwise what moefast computed
    before half tables existed. ``FP16`` / ``BF16`` halve the tables' bytes: lookups convert each
    element exactly and pool in float32; the fused sparse optimizers (lazy Adam, row-wise
    Adagrad) keep their state in float32 and round updated rows back stochastically
    (:mod:`moefast.reference.embedding_optim`). A training option, not a property of the data
    (:class:`FeatureSpec`)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        import torch  # this module stays free of torch at import

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


class GateInit(enum.Enum):
    """How the MoE-MLoRA gate starts (the paper does not say; see docs/results/claims.md).

    ``RANDOM``: torch's default initialisation of ``Embedding`` (N(0, 1)) and ``Linear``
    (Kaiming-uniform): logits with a standard deviation of about 0.6, far from uniform, so the
    gate stage begins by diluting every domain's specialist with other domains' experts at
    random. This is *not* the seeds' start. ``KERAS``: the seeds' start, Keras' initialisers
    (``Embedding`` U(-0.05, 0.05), ``Dense`` Glorot-uniform, zero bias): logits of at most
    about 0.1, a near-uniform gate. ``SPECIALIST``: each domain starts with weight
    ``TowerConfig.gate_own_weight`` on its own expert(s), within the gate's architecture
    (:meth:`moefast.nn.tower.DomainGate.start_on_own_experts`).
    """

    RANDOM = "random"
    KERAS = "keras"
    SPECIALIST = "specialist"


class Precision(enum.Enum):
    """The arithmetic of a training step (``TrainConfig.precision``, ``--precision``).

    ``FP32`` (the default): everything in float32, bitwise what moefast computed before the
    option existed. ``BF16_MIXED``: the operands of the wide products (the tower's shared
    weights and layer inputs, the interaction parts' dense layers) are rounded to bfloat16 and
    multiplied with float32 accumulation and a float32 result; the rank-space intermediate, the
    gate weights, the adapter sum, every epilogue, the master weights and the optimizer state
    stay float32 (:mod:`moefast.precision`, docs/performance.md).
    """

    FP32 = "fp32"
    BF16_MIXED = "bf16-mixed"


class PretrainedMode(enum.Enum):
    """What training does to a dataset's pretrained tables (``dataset.pretrained``).

    ``FROZEN`` (the default, and the seeds' Taobao setting): the tables and their fields'
    first-order weights stay bitwise unchanged in every stage of every method.
    ``FINETUNE``: they train like any learned table, where the stage trains the embeddings.
    """

    FROZEN = "frozen"
    FINETUNE = "finetune"


def _positive(owner: str, name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")


def _in_range(owner: str, name: str, value: object, low: float, high: float, *, low_open: bool) -> None:
    """``ValueError`` unless ``value`` is a finite real number in ``(low, high]`` (``low_open``)
    or ``[low, high]``; NaN and infinities never pass."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{owner}.{name} must be a finite number in {interval}, got {value!r}")


def _count(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a whole number >= 1, got {value!r}")


# The ranges TrainConfig accepts (docs/reliability.md). Each is far wider than any setting that
# trains (Adam's lr is 1e-3 in the seeds, embedding lrs up to about 0.1), and narrow enough that
# a typo (1e30, inf, nan) is refused before any data loads: values inside that still diverge
# stop the stage with NonFiniteError (moefast.train.loop).
LR_RANGE = (0.0, 10.0)  # (0, 10]
EPS_RANGE = (0.0, 1.0)  # (0, 1]
L2_RANGE = (0.0, 1.0)  # [0, 1]
# The device types training can use: the reference ops run on both, the kernels on CUDA. meta
# (no data), and the devices nothing here was written or tested for, are refused when built.
TRAIN_DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class TowerConfig:
    """The DNN tower of a backbone (DESIGN.md section 2).

    ``ranks`` gives one LoRA rank per hidden layer; when ``None`` it is derived from ``alpha``
    as ``r = max(units // alpha, 1)`` (no ``alpha / r`` scaling anywhere). ``alpha=None`` means
    the seeds' table entry for the backbone and dataset, filled in by
    :func:`moefast.models.build`. ``gate_dim`` is the width of the gate's domain embedding (4 in
    the method). ``gate_init`` chooses how the MoE-MLoRA gate starts; ``gate_own_weight`` is the
    weight a specialist start puts on each domain's own experts (in ``(1/D, 1)``; the gate's
    scale follows from it, ``D`` and ``E``).
    """

    kind: TowerKind = TowerKind.BASE
    hidden_units: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.5
    alpha: int | None = None
    ranks: tuple[int, ...] | None = None
    experts_per_domain: int = 1
    gate_dim: int = 4
    gate_init: GateInit = GateInit.SPECIALIST
    gate_own_weight: float = 0.8

    def __post_init__(self) -> None:
        if not isinstance(self.gate_init, GateInit):
            raise TypeError(f"TowerConfig.gate_init must be a GateInit, got {self.gate_init!r}")
        if not 0.0 < self.gate_own_weight < 1.0:
            raise ValueError(f"TowerConfig.gate_own_weight must be in (0, 1), got {self.gate_own_weight!r}")
        if not isinstance(self.kind, TowerKind):
            raise TypeError(f"TowerConfig.kind must be a TowerKind, got {self.kind!r}")
        if not self.hidden_units or any(u < 1 for u in self.hidden_units):
            raise ValueError(f"TowerConfig.hidden_units must be positive, got {self.hidden_units!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TowerConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.alpha is not None:
            _positive("TowerConfig", "alpha", self.alpha)
        _positive("TowerConfig", "experts_per_domain", self.experts_per_domain)
        _positive("TowerConfig", "gate_dim", self.gate_dim)
        if self.ranks is not None:
            if len(self.ranks) != len(self.hidden_units):
                raise ValueError(
                    f"TowerConfig.ranks {self.ranks!r} needs one rank per hidden layer "
                    f"{self.hidden_units!r}"
                )
            if any(r < 1 for r in self.ranks):
                raise ValueError(f"TowerConfig.ranks must be >= 1, got {self.ranks!r}")

    @property
    def layer_ranks(self) -> tuple[int, ...]:
        """One rank per hidden layer: ``ranks`` if given, else ``max(units // alpha, 1)``."""
        if self.ranks is not None:
            return self.ranks
        if self.alpha is None:
            raise ValueError("TowerConfig needs alpha or ranks to size its adapters")
        return tuple(max(u // self.alpha, 1) for u in self.hidden_units)

    def num_experts(self, num_domains: int) -> int:
        """Adapters per layer: 0 (base), ``D`` (MLoRA) or ``experts_per_domain * D``."""
        if self.kind is TowerKind.BASE:
            return 0
        if self.kind is TowerKind.MLORA:
            return num_domains
        return self.experts_per_domain * num_domains


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, staging and early stopping (DESIGN.md section 2, "Loop and hyperparameters").

    ``max_epochs`` caps every stage; ``expert_max_epochs`` / ``gate_max_epochs`` override it for
    the MoE-MLoRA expert and gate stages. ``train_backbone_in_later_stages`` keeps embeddings and
    the non-tower parts trainable in the expert and gate stages (the public code's behaviour;
    the method freezes them). ``seeds_compat`` reproduces the seeds' public code where it departs
    from the paper: non-tower parts trainable in every stage, the best validation score carried
    from one stage into the next (a stage keeps its new weights only if it beats every earlier
    stage), the weights reverted to the best checkpoint after every epoch that does not improve,
    and (so that the carried score compares like with like) experts early-stopped on the mean
    validation AUC over all domains. ``seed`` seeds model-independent randomness of the loop (batch
    order, dropout); the model's initial weights come from :func:`moefast.models.build`'s seed.
    ``embedding_optimizer`` chooses how the tables are updated (:class:`EmbeddingOptimizer`);
    ``embedding_lr`` is its learning rate (``None``: ``lr``). ``table_precision`` stores the
    tables in float32 (default), float16 or bfloat16 (:class:`TablePrecision`); half tables need
    a fused ``embedding_optimizer``. ``pretrained`` decides whether a
    dataset's pretrained tables stay frozen in every stage (the default, and under
    ``seeds_compat`` and ``train_backbone_in_later_stages`` too) or are fine-tuned.
    ``batch_mode`` ``None`` is the library's default protocol (:attr:`batches`). ``precision``
    is the step's arithmetic (:class:`Precision`; evaluation always runs in float32).

    **Budget** (docs/method.md, "Budget"): ``eval_every`` validates every that many optimizer
    steps of a stage (``None``: after every epoch, the protocol of claims v1). ``patience``
    counts validations without a strict improvement; ``max_steps`` and ``max_epochs`` cap a
    stage (``None``: no cap of that kind; at least one must be set). Steps mean the same in
    every stage, where an epoch does not: an expert's epoch (its own domain) is 4 to 16 steps,
    a mixed-batch epoch over all domains about 118. A stage ended by a cap is recorded
    (``stopped_by: cap`` in ``metrics.json``) and warned about: a cap that binds is a defect of
    the budget. ``frozen_path_dropout`` keeps the tower's dropout in the stages whose shared
    path is frozen (MoE-MLoRA's expert and gate stages, MLoRA's ``pretrain-freeze`` adapter
    stage); off, those stages draw no mask, since dropout on a frozen path only adds noise to
    the adapters' gradients. Stages that train the shared path always keep their dropout.
    ``seeds_gate`` says whether the gate trains under ``seeds_compat`` (:class:`SeedsGate`).

    Accepted values (anything else is a ``ValueError`` here, before any data loads): ``lr`` and
    ``embedding_lr`` finite in (0, 10]; ``eps`` finite in (0, 1]; ``l2`` finite in [0, 1];
    ``betas`` two numbers in [0, 1); batch sizes, epoch caps and ``patience`` whole numbers
    >= 1. ``embedding_lr`` needs a fused ``embedding_optimizer`` (under ``ADAM`` it would do
    nothing). Values inside these ranges that still make training diverge stop the stage with
    :class:`moefast.train.loop.NonFiniteError`.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 1024
    eval_batch_size: int = 32768
    l2: float = 1e-5
    # The budget (docs/method.md, "Budget"): a validation every 100 steps, patience 3
    # validations, a safety cap of 20,000 steps a stage that should never bind (the claims'
    # core at 200,000 rows: the longest stage, the backbone, stopped by patience after about
    # 2,700 steps; docs/results/claims-pilot.md), no epoch cap.
    max_epochs: int | None = None
    expert_max_epochs: int | None = None
    gate_max_epochs: int | None = None
    patience: int = 3
    eval_every: int | None = 100
    max_steps: int | None = 20_000
    # Off by the rule fixed before the claims' runs (docs/method.md, "Frozen-path dropout"): in
    # the core, MoE-MLoRA's paired WAUC off - on was +0.78 +/- 0.44 points over 5 seeds.
    frozen_path_dropout: bool = False
    seeds_gate: SeedsGate = SeedsGate.FROZEN
    batch_mode: BatchMode | None = None
    expert_stop: ExpertStopRule = ExpertStopRule.OWN_DOMAIN
    mlora_mode: MLoRAMode = MLoRAMode.JOINT
    train_backbone_in_later_stages: bool = False
    seeds_compat: bool = False
    seed: int = 1024
    device: str = "cpu"
    progress: bool = True
    embedding_optimizer: EmbeddingOptimizer = EmbeddingOptimizer.ADAM
    embedding_lr: float | None = None
    pretrained: PretrainedMode = PretrainedMode.FROZEN
    table_precision: TablePrecision = TablePrecision.FP32
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        # Ranges: LR_RANGE, EPS_RANGE, L2_RANGE above; every value must be finite.
        _in_range("TrainConfig", "lr", self.lr, *LR_RANGE, low_open=True)
        _in_range("TrainConfig", "eps", self.eps, *EPS_RANGE, low_open=True)
        _in_range("TrainConfig", "l2", self.l2, *L2_RANGE, low_open=False)
        for name in ("batch_size", "eval_batch_size", "patience"):
            _count("TrainConfig", name, getattr(self, name))
        for name in ("max_epochs", "expert_max_epochs", "gate_max_epochs", "eval_every", "max_steps"):
            value = getattr(self, name)
            if value is not None:
                _count("TrainConfig", name, value)
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("TrainConfig needs a cap on every stage: max_epochs or max_steps (or both)")
        if not isinstance(self.frozen_path_dropout, bool):
            raise TypeError(f"TrainConfig.frozen_path_dropout must be a bool, got {self.frozen_path_dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TrainConfig.seed must be a whole number, got {self.seed!r}")
        device_type = str(self.device).split(":", 1)[0]
        if device_type not in TRAIN_DEVICE_TYPES:
            raise ValueError(
                f"--device {str(self.device)!r}: training runs on {' or '.join(TRAIN_DEVICE_TYPES)} "
                "devices only (TrainConfig.device)"
            )
        if not re.fullmatch(r"[a-z]+(:[0-9]+)?", str(self.device)):
            raise ValueError(f"--device {str(self.device)!r}: not a device (TrainConfig.device): write "
                             f"{device_type} or {device_type}:INDEX")
        if self.embedding_lr is not None:
            _in_range("TrainConfig", "embedding_lr", self.embedding_lr, *LR_RANGE, low_open=True)
            if self.embedding_optimizer is EmbeddingOptimizer.ADAM:
                raise ValueError(
                    "TrainConfig.embedding_lr applies to a fused embedding optimizer (lazy-adam, "
                    "rowwise-adagrad) only; under adam the tables train in the dense Adam with lr"
                )
        if (
            not isinstance(self.betas, tuple | list)
            or len(self.betas) != 2
            or not all(
                isinstance(b, int | float) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in self.betas
            )
        ):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.batch_mode is not None and not isinstance(self.batch_mode, BatchMode):
            raise TypeError(f"TrainConfig.batch_mode must be a BatchMode or None, got {self.batch_mode!r}")
        for name, kind in (
            ("expert_stop", ExpertStopRule),
            ("mlora_mode", MLoRAMode),
            ("embedding_optimizer", EmbeddingOptimizer),
            ("pretrained", PretrainedMode),
            ("seeds_gate", SeedsGate),
            ("table_precision", TablePrecision),
            ("precision", Precision),
        ):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"TrainConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        if self.table_precision is not TablePrecision.FP32 and self.embedding_optimizer is EmbeddingOptimizer.ADAM:
            raise ValueError(
                f"--table-precision {self.table_precision.value} needs a fused embedding optimizer that keeps "
                "float32 state: pass --embedding-optimizer lazy-adam or rowwise-adagrad (dense adam is refused)"
            )

    @property
    def batches(self) -> BatchMode:
        """The batch protocol in force: ``batch_mode`` if set, else mixed batches, or the seeds'
        single-domain batches under ``seeds_compat``. Mixed is the default because it won for
        every method in the claims' core setting (docs/results/claims.md); the seeds' code and
        the paper use single-domain batches."""
        if self.batch_mode is not None:
            return self.batch_mode
        return BatchMode.SINGLE_DOMAIN if self.seeds_compat else BatchMode.MIXED


# The synthetic preset of a run that names none, from every entry point (the command line, the
# grid, the claims' core setting and ``moefast.data.load("synthetic")``): Taobao-like, pretrained
# tables, 20 domains, where the three methods differ (docs/results/claims.md).
DEFAULT_PRESET = "taobao"


@dataclass(frozen=True)
class DataConfig:
    """Which dataset a run loads (``moefast.data.load``'s name and options).

    ``None`` leaves an option to the source's default (``preset``: :data:`DEFAULT_PRESET`). The keys of :data:`SYNTHETIC_OPTIONS`
    (``preset``, ``rows``, ``num_domains``, ``num_users``, ``num_items``, ``diversity``,
    ``imbalance``, ``data_seed``, ``numeric_fields``, ``numeric_scale``, ``clusters``,
    ``cluster_spread``) apply to
    ``synthetic``; ``domain`` and ``data_dir`` to the real sources; ``data`` (a file or folder),
    ``schema`` (a TOML file) and ``vocab_from`` (a run directory or a ``vocab.json``) to ``table``;
    ``stream`` (read Parquet as training goes), ``shuffle_buffer`` (rows; changes results) and
    ``read_ahead`` (bytes; speed only) to a streamed ``table``.
    """

    dataset: str = "synthetic"
    preset: str | None = None
    domain: str | None = None
    data_dir: str | None = None
    rows: int | None = None
    num_domains: int | None = None
    num_users: int | None = None
    num_items: int | None = None
    diversity: float | None = None
    imbalance: float | None = None
    data_seed: int | None = None
    data: str | None = None
    schema: str | None = None
    vocab_from: str | None = None
    numeric_fields: int | None = None
    numeric_scale: float | None = None
    clusters: int | None = None
    cluster_spread: float | None = None
    stream: bool | None = None
    shuffle_buffer: int | None = None
    read_ahead: int | None = None


# DataConfig's synthetic options and the synthetic source's keyword for each.
SYNTHETIC_OPTIONS = {
    "preset": "preset", "rows": "rows", "num_domains": "num_domains", "num_users": "num_users",
    "num_items": "num_items", "diversity": "diversity", "imbalance": "imbalance", "data_seed": "seed",
    "numeric_fields": "numeric_fields", "numeric_scale": "numeric_scale",
    "clusters": "clusters", "cluster_spread": "cluster_spread",
}


TABLE_OPTIONS = {"data": "path", "schema": "schema", "vocab_from": "vocab_from"}
# A streamed table's options (DataConfig key: the table source's keyword), given only with stream.
STREAM_OPTIONS = {"stream": "stream", "shuffle_buffer": "shuffle_rows", "read_ahead": "read_ahead"}


def load_options(data: DataConfig, flag: Callable[[str], str] = str) -> dict[str, Any]:
    """``moefast.data.load``'s options for ``data`` (the one mapping, for the command line, the
    grid and :func:`moefast.experiments.run_methods` alike): the default preset for synthetic
    data, each set option under its source's keyword.

    Raises:
        ValueError: an option that does not apply to ``data.dataset``, or a table without its
            file or schema; ``flag`` spells the option's name in the message (the command line
            passes ``--rows`` for ``rows``).
    """
    def set_(keys: Iterable[str]) -> list[str]:
        return [key for key in keys if getattr(data, key) is not None]

    if data.dataset != "table":
        for key in set_((*TABLE_OPTIONS, *STREAM_OPTIONS)):
            raise ValueError(f"{flag(key)} applies to {flag('dataset')} table only")
    if data.dataset == "table":
        for key in set_((*SYNTHETIC_OPTIONS, "domain", "data_dir")):
            raise ValueError(f"{flag(key)} does not apply to {flag('dataset')} table (the schema names the columns)")
        if data.data is None or data.schema is None:
            raise ValueError(f"{flag('dataset')} table needs {flag('data')} PATH and {flag('schema')} schema.toml")
        if not data.stream:
            for key in set_(("shuffle_buffer", "read_ahead")):
                raise ValueError(f"{flag(key)} applies to a streamed table ({flag('stream')}) only")
        options = {dest: getattr(data, key) for key, dest in TABLE_OPTIONS.items()}
        if data.stream:
            options.update({dest: getattr(data, key) for key, dest in STREAM_OPTIONS.items()})
        return options
    if data.dataset == "synthetic":
        for key in set_(("domain", "data_dir")):
            raise ValueError(f"{flag(key)} does not apply to the synthetic dataset")
        return {"preset": DEFAULT_PRESET} | {dest: getattr(data, key) for key, dest in SYNTHETIC_OPTIONS.items()
                                             if getattr(data, key) is not None}
    for key in set_(SYNTHETIC_OPTIONS):
        raise ValueError(f"{flag(key)} applies to the synthetic dataset only, not {data.dataset!r}")
    return {dest: getattr(data, key) for key, dest in (("data_dir", "raw_dir"), ("domain", "domain"))
            if getattr(data, key) is not None}


def default_tower(train: TrainConfig) -> TowerConfig:
    """The tower a run builds when it names none: the method's, with the seeds' Keras gate start
    under ``seeds_compat`` and :class:`TowerConfig`'s default start otherwise."""
    return TowerConfig(gate_init=GateInit.KERAS) if train.seeds_compat else TowerConfig()


@dataclass(frozen=True)
class RunConfig:
    """One ``moefast train`` invocation: data, backbone, methods and training.

    ``methods`` are trained one after another on the same data, each into its own
    subdirectory of ``out`` when there are several. ``gate_init`` / ``gate_own_weight``
    (``None``: :func:`default_tower`'s) choose the MoE-MLoRA gate's start.
    """

    data: DataConfig = DataConfig()
    model: str = "deepfm"
    methods: tuple[TowerKind, ...] = (TowerKind.BASE, TowerKind.MLORA, TowerKind.MOE_MLORA)
    experts_per_domain: int = 1
    backend: str | None = None
    out: str | None = None
    train: TrainConfig = TrainConfig()
    gate_init: GateInit | None = None
    gate_own_weight: float | None = None
    overwrite: bool = False  # clear ``out`` when it holds a previous moefast run

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("RunConfig.methods must name at least one method")
        _positive("RunConfig", "experts_per_domain", self.experts_per_domain)
        self.tower_config()  # refuse a bad gate option now, not after the data has loaded

    def tower_config(self) -> TowerConfig:
        """The tower every method of the run builds (its kind and experts are set per method)."""
        tower = default_tower(self.train)
        if self.gate_own_weight is not None:
            if self.gate_init is GateInit.RANDOM:
                raise ValueError("gate_own_weight sets a specialist gate start; it does nothing with gate_init random")
            # An own-expert weight asks for the start it configures, also under seeds_compat.
            tower = replace(tower, gate_init=GateInit.SPECIALIST, gate_own_weight=self.gate_own_weight)
        if self.gate_init is not None:
            tower = replace(tower, gate_init=self.gate_init)
        return tower
