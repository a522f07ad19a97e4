"""Every backbone and tower accepts a 0-row batch, forward and backward, on every backend and
routing (issue 15). Data-parallel slices and domains without validation rows produce them; six
of the eight backbones used to fail on a ``reshape(B, F, -1)`` that has nothing to infer from.
"""

from __future__ import annotations

import pytest
import torch
from test_models import tiny_dataset

from moefast import _ext, models
from moefast.config import TowerConfig
from moefast.nn.tower import Routing

BACKBONES = ["autoint", "dcn", "deepfm", "fibinet", "nfm", "pnn", "wdl", "xdeepfm"]
FAST = pytest.param("fast", marks=pytest.mark.skipif(not _ext.available(), reason="moefast._C not built"))
TOWER = TowerConfig(hidden_units=(8, 6), ranks=(2, 1), dropout=0.5)  # dropout on: its mask is drawn too
ROUTINGS = {
    "base": [(Routing.SHARED, None)],
    "mlora": [(Routing.SHARED, None), (Routing.DOMAIN, None)],
    "moe-mlora": [(Routing.SHARED, None), (Routing.EXPERT, 1), (Routing.MIXTURE, None)],
}


@pytest.mark.parametrize("backend", ["reference", FAST])
@pytest.mark.parametrize("kind", list(ROUTINGS))
@pytest.mark.parametrize("name", BACKBONES)
def test_zero_row_batch_forward_and_backward(name: str, kind: str, backend: str) -> None:
    ds = tiny_dataset(n=12)
    model = models.build(name, ds, kind, experts_per_domain=2, tower_config=TOWER, backend=backend)
    empty = ds.train.rows(torch.arange(0))
    for routing, expert in ROUTINGS[kind]:
        model.tower.set_routing(routing, expert)
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(empty.features, empty.domain)
        assert logits.shape == (0,) and logits.dtype == torch.float32
        # A sum over no rows is 0 (a mean would be NaN): what a data-parallel slice contributes.
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, empty.label, reduction="sum")
        loss.backward()
        for pname, p in model.named_parameters():
            if p.grad is not None:
                assert not p.grad.is_sparse and not p.grad.any(), f"{name}/{kind}/{routing}: {pname}"
        model.eval()
        with torch.no_grad():
            assert model(empty.features, empty.domain).shape == (0,)


@pytest.mark.parametrize("kind", list(ROUTINGS))
def test_training_on_domains_without_rows_finishes(kind: str) -> None:
    """The issue's reproduction end to end (``moefast train --rows 5``): most of the 20 domains
    have no training, validation or test rows, and every MoE-MLoRA expert stage of such a domain
    scores 0 rows. Training finishes; a domain without test rows reports a null AUC."""
    from moefast import data
    from moefast.config import TrainConfig
    from moefast.train import fit

    ds = data.load("synthetic", preset="paper", rows=5)
    empty = [d for d in range(ds.num_domains) if not bool((ds.val.domain == d).any())]
    assert len(empty) > ds.num_domains // 2
    model = models.build("deepfm", ds, kind, tower_config=TOWER, seed=3)
    result = fit(model, ds, TrainConfig(max_epochs=1, batch_size=64, progress=False))
    assert len(result.stages) == (ds.num_domains + 2 if kind == "moe-mlora" else 1)
    per_domain = result.metrics["test"]["per_domain"]
    assert all(row["auc"] is None for row in per_domain if row["n"] == 0)
