"""Training stages and the one function that decides what trains (DESIGN.md section 2).

- base: ``JOINT`` (everything but the unused adapter trains; shared routing).
- MLoRA: ``JOINT`` (shared and adapter weights together, each sample through its domain's
  adapter); or, in ``pretrain-freeze`` mode, ``BACKBONE`` then ``ADAPTERS``.
- MoE-MLoRA: ``BACKBONE`` (no adapters), ``EXPERT i`` for every expert (only expert ``i``, on
  domain ``i % D``, forward = base + expert ``i``), ``GATE`` (only the gate, full mixture).

Freezing is real: :func:`set_stage` sets ``requires_grad`` on every parameter and returns
exactly the stage's tensors for the optimizer. Experts are slices of stacked tensors
(``lora_A [E, in, r]``...), so the ``EXPERT i`` stage hands the optimizer the stacked tensors and
:func:`mask_gradients` zeroes every other expert's slice of their gradients before each step;
with Adam's fresh state a zero gradient moves nothing, so those slices stay bitwise unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import nn

from moefast.config import MLoRAMode, SeedsGate, TowerKind
from moefast.models.base import CTRModel
from moefast.nn.embedding import EmbeddingCollection
from moefast.nn.tower import Routing

__all__ = ["Stage", "StageStep", "apply_frozen_path_dropout", "mask_gradients", "plan_stages", "set_stage",
           "stage_state_keys"]


class Stage(enum.Enum):
    JOINT = "joint"
    BACKBONE = "backbone"
    ADAPTERS = "adapters"
    EXPERT = "expert"
    GATE = "gate"


@dataclass(frozen=True)
class StageStep:
    """One stage of a plan; ``expert`` is set for (and only for) ``Stage.EXPERT``."""

    stage: Stage
    expert: int | None = None

    def __post_init__(self) -> None:
        if (self.stage is Stage.EXPERT) != (self.expert is not None):
            raise ValueError(f"stage {self.stage.value!r} with expert={self.expert!r}")

    @property
    def label(self) -> str:
        """``"backbone"``, ``"expert_3"``, ...: the name in checkpoints and metrics.json."""
        return self.stage.value if self.expert is None else f"{self.stage.value}_{self.expert}"


def plan_stages(model: CTRModel, mlora_mode: MLoRAMode = MLoRAMode.JOINT) -> list[StageStep]:
    """The stages that train ``model`` from scratch, in order."""
    kind = model.tower.kind
    if kind is TowerKind.BASE:
        return [StageStep(Stage.JOINT)]
    if kind is TowerKind.MLORA:
        if mlora_mode is MLoRAMode.JOINT:
            return [StageStep(Stage.JOINT)]
        return [StageStep(Stage.BACKBONE), StageStep(Stage.ADAPTERS)]
    experts = [StageStep(Stage.EXPERT, i) for i in range(model.tower.num_experts)]
    return [StageStep(Stage.BACKBONE), *experts, StageStep(Stage.GATE)]


_ROUTING: dict[tuple[TowerKind, Stage], Routing] = {
    (TowerKind.BASE, Stage.JOINT): Routing.SHARED,
    (TowerKind.MLORA, Stage.JOINT): Routing.DOMAIN,
    (TowerKind.MLORA, Stage.BACKBONE): Routing.SHARED,
    (TowerKind.MLORA, Stage.ADAPTERS): Routing.DOMAIN,
    (TowerKind.MOE_MLORA, Stage.BACKBONE): Routing.SHARED,
    (TowerKind.MOE_MLORA, Stage.EXPERT): Routing.EXPERT,
    (TowerKind.MOE_MLORA, Stage.GATE): Routing.MIXTURE,
}


def set_stage(
    model: CTRModel,
    step: StageStep,
    *,
    train_backbone: bool = False,
    freeze_pretrained: bool = True,
    seeds_as_run: bool = False,
    seeds_gate: SeedsGate = SeedsGate.FROZEN,
) -> list[nn.Parameter]:
    """Route the tower for ``step``, freeze everything outside it, return its parameters.

    Args:
        model: the model; its tower's routing and every parameter's ``requires_grad`` change.
        step: the stage (and expert).
        train_backbone: in the ``ADAPTERS``, ``EXPERT`` and ``GATE`` stages, keep the
            embeddings and every other non-tower parameter trainable (the public code's
            behaviour); by default they are frozen, as the method describes.
        freeze_pretrained: keep the pretrained fields' tables and first-order weights
            (``model.pretrained_parameters()``) frozen in every stage, whatever the rest says
            (the seeds' Taobao runs); ``False`` fine-tunes them where the stage trains the
            embeddings.
        seeds_as_run: the seeds' code as it runs under TF 1.12 (docs/method.md): its graph is
            built once with the gate, so every stage computes the full mixture (no expert
            routing) and every weight but the gate's trains; only ``freeze_pretrained`` and
            ``seeds_gate`` still apply. The stage then decides only which domains train
            (expert ``i``: domain ``i % D``).
        seeds_gate: with ``seeds_as_run``, what the gate does (:class:`moefast.config.SeedsGate`):
            ``GATE_STAGE`` trains its linear part in the ``GATE`` stage.

    Returns:
        The tensors the stage's optimizer must hold, in ``model.parameters()`` order.
    """
    tower = model.tower
    routing = _ROUTING.get((tower.kind, step.stage))
    if routing is None:
        raise ValueError(f"a {tower.kind.value} model has no {step.stage.value!r} stage")
    if seeds_as_run and tower.kind is TowerKind.MOE_MLORA:
        tower.set_routing(Routing.MIXTURE)
    else:
        tower.set_routing(routing, step.expert)

    backbone = model.backbone_parameters()
    shared = tower.shared_parameters()
    adapters = tower.adapter_parameters()
    gate = tower.gate_parameters()
    if seeds_as_run:
        gate_linear = [] if tower.gate is None else list(tower.gate.linear.parameters())
        gate_trains = seeds_gate is SeedsGate.GATE_STAGE and step.stage is Stage.GATE
        chosen = [*backbone, *shared, *adapters, *(gate_linear if gate_trains else [])]
    elif step.stage is Stage.JOINT:
        chosen = [*backbone, *shared, *adapters]
    elif step.stage is Stage.BACKBONE:
        chosen = [*backbone, *shared]
    else:
        chosen = gate if step.stage is Stage.GATE else adapters
        if train_backbone:
            chosen = [*backbone, *chosen]

    if freeze_pretrained:
        frozen = {id(p) for p in model.pretrained_parameters()}
        chosen = [p for p in chosen if id(p) not in frozen]
    ids = {id(p) for p in chosen}
    trainable = []
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
        if id(p) in ids:
            trainable.append(p)
    return trainable


def stage_state_keys(model: nn.Module, trained: list[nn.Parameter]) -> set[str]:
    """The state-dict keys a stage that trains ``trained`` (what :func:`set_stage` returned)
    changes: what its checkpoint stores, the rest being the previous stage's
    (:mod:`moefast.runs.checkpoint`). Decided from what trains, never by comparing values.

    - every name of a trained parameter (a shared tensor under all its names);
    - a fused embedding optimizer's state (``<collection>.optimizer_state.<table>.<slot>``) when
      its table trains: it moves only in that table's backward;
    - every other buffer, whatever trains: a buffer may move in any forward (a batch norm's
      running statistics), so only those known to follow a frozen table are left out.
    """
    ids = {id(p) for p in trained}
    keys = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}
    follows: dict[int, bool] = {}  # id of a buffer owned by a table's optimizer state: the table trains
    for collection in (m for m in model.modules() if isinstance(m, EmbeddingCollection)):
        for table, holder in collection.optimizer_state.items():
            for buffer in holder.buffers():
                follows[id(buffer)] = id(collection.tables[table]) in ids
    keys.update(name for name, b in model.named_buffers(remove_duplicate=False) if follows.get(id(b), True))
    return keys


def mask_gradients(model: CTRModel, step: StageStep) -> None:
    """In an ``EXPERT i`` stage routed to expert ``i``, zero the gradient slices of every expert
    but ``i`` (under the seeds' as-run mixture routing every expert trains: nothing is masked).

    The forward only reads expert ``i``, so those slices are zero already on the reference
    path; this makes the guarantee independent of how a backend fills them.
    """
    if step.stage is not Stage.EXPERT or model.tower.routing is not Routing.EXPERT:
        return
    e = step.expert
    assert e is not None
    for p in model.tower.adapter_parameters():
        if p.grad is not None:
            p.grad[:e].zero_()
            p.grad[e + 1 :].zero_()


def apply_frozen_path_dropout(model: CTRModel, frozen_path_dropout: bool) -> bool:
    """After :func:`set_stage`: keep the tower's dropout on its shared path when that path
    trains, or when ``frozen_path_dropout`` asks for it on a frozen one (the seeds' behaviour);
    otherwise draw no mask (dropout on a path that does not train only adds noise to the
    adapters' gradients). Returns whether dropout is on."""
    shared_trains = any(p.requires_grad for p in model.tower.shared_parameters())
    active = shared_trains or frozen_path_dropout
    model.tower.set_shared_dropout(active)
    return active
