"""Every backbone, forward and backward, in all three tower modes, on tiny data."""

from __future__ import annotations

import pytest
import torch
from test_models import D, randomise, tiny_dataset

from moefast import models
from moefast.config import FeatureSpec, TowerConfig
from moefast.data.dataset import MultiDomainDataset, Split
from moefast.models.alpha import ALPHA
from moefast.nn.tower import Routing

BACKBONES = ["autoint", "dcn", "deepfm", "fibinet", "nfm", "pnn", "wdl", "xdeepfm"]
TINY_TOWER = TowerConfig(hidden_units=(8, 6), ranks=(2, 1), dropout=0.0)


def test_registry_and_alpha_table_cover_the_eight_backbones() -> None:
    assert sorted(models.MODELS) == BACKBONES
    assert sorted(ALPHA) == BACKBONES


@pytest.mark.parametrize("kind", ["base", "mlora", "moe-mlora"])
@pytest.mark.parametrize("name", BACKBONES)
def test_forward_backward_reaches_every_trainable_parameter(name: str, kind: str) -> None:
    ds = tiny_dataset(n=24)
    model = models.build(name, ds, kind, experts_per_domain=2, tower_config=TINY_TOWER)
    # Random values everywhere: fresh adapters are a no-op (B = c = 0), which blocks the
    # gradient of A and the gate, and FiBiNET's one-unit SENET can start with a dead ReLU.
    randomise(model, seed=11)
    batch = ds.train.rows(torch.arange(24))
    logits = model(batch.features, batch.domain)
    assert logits.shape == (24,) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label).backward()
    # The base tower's one placeholder adapter is never routed to; MLoRA has no gate.
    for pname, p in model.named_parameters():
        if kind == "base" and ".lora_" in pname:
            assert p.grad is None, f"{name}/{kind}: the unused {pname} got a gradient"
            continue
        assert p.grad is not None, f"{name}/{kind}: no gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}/{kind}: zero gradient for {pname}"

@pytest.mark.parametrize("name", BACKBONES)
def test_moe_routings_and_build_defaults(name: str) -> None:
    """Default towers (256, 128, 64) with the alpha table; every MoE-MLoRA routing runs."""
    ds = tiny_dataset(n=6)
    model = models.build(name, ds, "moe-mlora").eval()
    alpha = ALPHA[name][0]  # synthetic data uses the MovieLens column
    assert [layer.rank for layer in model.tower.layers] == [max(u // alpha, 1) for u in (256, 128, 64)]
    batch = ds.train.rows(torch.arange(6))
    for routing, expert in ((Routing.SHARED, None), (Routing.EXPERT, D - 1), (Routing.MIXTURE, None)):
        model.tower.set_routing(routing, expert)
        assert model(batch.features, batch.domain).shape == (6,)


@pytest.mark.parametrize("name", ["autoint", "fibinet", "nfm", "pnn", "xdeepfm"])
def test_field_interactions_need_one_embedding_dim(name: str) -> None:
    ds = tiny_dataset(dims=(4, 4, 6))
    with pytest.raises(ValueError, match=r"one embedding dim.*tags=6"):
        models.build(name, ds, "base")


def test_dcn_takes_mixed_dims() -> None:
    ds = tiny_dataset(n=5, dims=(4, 2, 6))
    model = models.build("dcn", ds, "mlora", tower_config=TINY_TOWER)
    batch = ds.train.rows(torch.arange(5))
    assert model(batch.features, batch.domain).shape == (5,)


def test_fibinet_needs_two_fields() -> None:
    base = tiny_dataset(n=4)
    split = Split({"uid": base.train.features["uid"]}, base.train.domain, base.train.label)
    one = MultiDomainDataset("one-field", (FeatureSpec("uid", 50, 4),), base.domain_names, split, split, split)
    with pytest.raises(ValueError, match="at least 2 fields"):
        models.build("fibinet", one, "base")
