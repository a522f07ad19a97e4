"""Stages freeze for real: after one step, only the stage's tensors (and slices) moved."""

from __future__ import annotations

import re

import pytest
import torch
from test_models import D, tiny_dataset

from moefast import models
from moefast.config import MLoRAMode, TowerConfig
from moefast.models.base import CTRModel
from moefast.train.loop import train_step
from moefast.train.stages import Stage, StageStep, plan_stages, set_stage

SMALL = TowerConfig(hidden_units=(8, 6), ranks=(2, 1))
ADAPTER = re.compile(r"^tower\.layers\.\d+\.lora_[ABc]$")
SHARED = re.compile(r"^tower\.(layers\.\d+\.(weight|bias)|output\.(weight|bias))$")
GATE = re.compile(r"^tower\.gate\.")


def expected_names(model: CTRModel, step: StageStep, train_backbone: bool) -> set[str]:
    """The stage's tensors, written from DESIGN.md section 2 by parameter name."""
    names = [n for n, _ in model.named_parameters()]
    backbone = {n for n in names if not n.startswith("tower.")}
    shared = {n for n in names if SHARED.match(n)}
    adapters = {n for n in names if ADAPTER.match(n)} if model.tower.num_experts else set()
    gate = {n for n in names if GATE.match(n)}
    assert backbone | shared | {n for n in names if ADAPTER.match(n)} | gate == set(names)
    if step.stage is Stage.JOINT:
        return backbone | shared | adapters
    if step.stage is Stage.BACKBONE:
        return backbone | shared
    own = gate if step.stage is Stage.GATE else adapters
    return own | (backbone if train_backbone else set())


CASES = [
    ("base", MLoRAMode.JOINT, False),
    ("mlora", MLoRAMode.JOINT, False),
    ("mlora", MLoRAMode.PRETRAIN_FREEZE, False),
    ("mlora", MLoRAMode.PRETRAIN_FREEZE, True),
    ("moe-mlora", MLoRAMode.JOINT, False),
    ("moe-mlora", MLoRAMode.JOINT, True),
]


@pytest.mark.parametrize(("tower", "mode", "train_backbone"), CASES)
def test_one_step_moves_only_the_stage(tower: str, mode: MLoRAMode, train_backbone: bool) -> None:
    ds = tiny_dataset(n=60)
    model = models.build("deepfm", ds, tower, experts_per_domain=2, tower_config=SMALL)
    batch = ds.train.rows(torch.arange(60))
    plan = plan_stages(model, mode)
    for step in plan:
        params = set_stage(model, step, train_backbone=train_backbone)
        optimizer = torch.optim.Adam(params, lr=1e-2)
        by_id = {id(p): n for n, p in model.named_parameters()}
        held = {by_id[id(p)] for group in optimizer.param_groups for p in group["params"]}
        want = expected_names(model, step, train_backbone)
        assert held == want, step.label
        assert {n for n, p in model.named_parameters() if p.requires_grad} == want
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_step(model, batch, step, optimizer, l2=1e-5)
        after = dict(model.named_parameters())
        for name, old in before.items():
            new = after[name].detach()
            if name not in want:
                assert torch.equal(new, old), f"{step.label}: frozen {name} moved"
            elif step.stage is Stage.EXPERT and ADAPTER.match(name):
                for e in range(model.tower.num_experts):
                    if e != step.expert:
                        assert torch.equal(new[e], old[e]), f"{step.label}: expert {e} of {name} moved"
        moved = [n for n in want if not torch.equal(after[n].detach(), before[n])]
        assert moved, f"{step.label}: nothing trained"
        if step.stage is Stage.EXPERT:
            assert step.expert is not None
            # B starts at zero, so A gets no gradient on the very first step; B and c do.
            for name in moved:
                assert ADAPTER.match(name) or not name.startswith("tower.")
            for layer in model.tower.layers:
                assert not torch.equal(layer.lora_c[step.expert], before[_name(model, layer.lora_c)][step.expert])


def _name(model: CTRModel, tensor: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is tensor)


def test_plans() -> None:
    ds = tiny_dataset()
    moe = models.build("deepfm", ds, "moe-mlora", experts_per_domain=2, tower_config=SMALL)
    labels = [s.label for s in plan_stages(moe)]
    assert labels == ["backbone", *(f"expert_{i}" for i in range(2 * D)), "gate"]
    mlora = models.build("deepfm", ds, "mlora", tower_config=SMALL)
    assert [s.label for s in plan_stages(mlora)] == ["joint"]
    assert [s.label for s in plan_stages(mlora, MLoRAMode.PRETRAIN_FREEZE)] == ["backbone", "adapters"]
    base = models.build("deepfm", ds, "base", tower_config=SMALL)
    assert [s.label for s in plan_stages(base)] == ["joint"]
    with pytest.raises(ValueError, match="no 'gate' stage"):
        set_stage(base, StageStep(Stage.GATE))
    with pytest.raises(ValueError, match="no 'joint' stage"):
        set_stage(moe, StageStep(Stage.JOINT))
    with pytest.raises(ValueError, match="expert=None"):
        StageStep(Stage.EXPERT)
