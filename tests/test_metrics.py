"""Exact AUC, mean AUC, WAUC and logloss against scikit-learn on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from moefast.train.metrics import auc, evaluate_scores, logloss


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=300),
    levels=st.sampled_from([2, 5, 1000]),  # few levels: many ties, which count one half
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_auc_equals_sklearn(n: int, levels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, n).astype(np.float32) / levels
    labels = rng.integers(0, 2, n).astype(np.float32)
    got = auc(torch.from_numpy(scores), torch.from_numpy(labels))
    if labels.min() == labels.max():
        assert got is None
    else:
        assert got == pytest.approx(roc_auc_score(labels, scores), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("labels", [[0.0, 0.0, 0.0], [1.0, 1.0], []], ids=["negatives", "positives", "empty"])
def test_one_class_has_no_auc(labels: list[float]) -> None:
    y = torch.tensor(labels)
    assert auc(torch.rand(len(labels)), y) is None


def test_logloss_equals_sklearn() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, generator=gen) * 3
    labels = (torch.rand(500, generator=gen) < 0.3).float()
    probs = torch.sigmoid(logits.double()).numpy()
    assert logloss(logits, labels) == pytest.approx(log_loss(labels.numpy(), probs), rel=1e-9)


def test_domain_metrics_equal_sklearn_and_skip_one_class_domains() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 2000
    domain = torch.randint(0, 4, (n,), generator=gen)
    labels = (torch.rand(n, generator=gen) < 0.4).float()
    labels[domain == 2] = 0.0  # domain 2: one class, no AUC
    domain[domain == 3] = 1  # domain 3: no rows at all
    logits = torch.randn(n, generator=gen) + labels
    names = ("a", "b", "c", "d")
    m = evaluate_scores(logits, labels, domain, names)

    expected = {}
    for d in (0, 1):
        rows = (domain == d).numpy()
        expected[d] = roc_auc_score(labels.numpy()[rows], logits.numpy()[rows])
    by_domain = {row.domain: row for row in m.per_domain}
    assert [r.name for r in m.per_domain] == list(names)
    assert by_domain[2].auc is None and by_domain[3].auc is None and by_domain[3].n == 0
    for d in (0, 1):
        assert by_domain[d].auc == pytest.approx(expected[d], rel=1e-12)
        assert by_domain[d].n == int((domain == d).sum())
    n0, n1 = by_domain[0].n, by_domain[1].n
    assert m.mean_auc == pytest.approx((expected[0] + expected[1]) / 2, rel=1e-12)
    assert m.wauc == pytest.approx((n0 * expected[0] + n1 * expected[1]) / (n0 + n1), rel=1e-12)
    probs = torch.sigmoid(logits.double()).numpy()
    assert m.logloss == pytest.approx(log_loss(labels.numpy(), probs), rel=1e-9)
    as_json = m.to_dict()
    assert as_json["per_domain"][2] == {"domain": 2, "name": "c", "n": by_domain[2].n, "auc": None}


def test_no_domain_with_an_auc_gives_null_means() -> None:
    labels = torch.zeros(10)
    m = evaluate_scores(torch.randn(10), labels, torch.zeros(10, dtype=torch.int64), ("only",))
    assert math.isnan(m.mean_auc) and math.isnan(m.wauc)
    assert m.to_dict()["wauc"] is None and m.to_dict()["mean_auc"] is None
