"""Exact per-domain AUC, mean AUC, WAUC and logloss (DESIGN.md section 2, "Metrics").

A domain whose evaluated rows hold a single class (or no rows) has no AUC: it reports ``None``
(``null`` in ``metrics.json``) and is left out of the mean AUC and of the WAUC, whose weights
are then renormalised over the domains that do have one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["DomainMetrics", "EvalMetrics", "auc", "evaluate_scores", "logloss"]


def _refuse_nan(scores: torch.Tensor, what: str) -> None:
    # A NaN has no rank: sorted, it lands above every number, so one NaN on a positive row made
    # the AUC 1.0. Infinite scores rank fine (a logit of +inf is a probability of 1).
    if scores.is_floating_point():
        nan = int(torch.isnan(scores).sum())
        if nan:
            raise ValueError(
                f"{what}: {nan} of {scores.numel()} scores are NaN; a NaN has no rank, so no AUC "
                "is computed (did training diverge?)"
            )


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Exact ROC AUC (the Mann-Whitney statistic, ties counted half) or ``None`` for one class.

    ``ValueError`` for NaN scores (they have no rank), whatever the classes.

    Args:
        scores: ``[n]`` any real dtype (probabilities or logits: AUC only sees the order).
        labels: ``[n]`` in ``{0, 1}``.
    """
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must be equal 1-D shapes")
    _refuse_nan(scores, "auc")
    pos = labels > 0.5
    n_pos = int(pos.sum())
    n_neg = int(labels.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    s = scores.double()
    order = torch.argsort(s)
    sorted_s = s[order]
    # Average rank (1-based) of each run of tied scores: that counts every tie as one half.
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1.0) / 2.0
    ranks = avg_rank[inverse]
    pos_rank_sum = float(ranks[pos[order]].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy from logits ``[n]``, computed in float64 (no clipping needed)."""
    if logits.numel() == 0:
        return math.nan
    z = logits.double()
    y = labels.double()
    return float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))


@dataclass(frozen=True)
class DomainMetrics:
    domain: int
    name: str
    n: int
    auc: float | None


@dataclass(frozen=True)
class EvalMetrics:
    """Metrics of one evaluated split. ``mean_auc`` / ``wauc`` are NaN if no domain has an AUC."""

    per_domain: tuple[DomainMetrics, ...]
    mean_auc: float
    wauc: float
    logloss: float

    def to_dict(self) -> dict[str, object]:
        """The ``test`` object of ``metrics.json``."""
        return {
            "wauc": _json_float(self.wauc),
            "mean_auc": _json_float(self.mean_auc),
            "logloss": _json_float(self.logloss),
            "per_domain": [
                {"domain": d.domain, "name": d.name, "n": d.n, "auc": d.auc} for d in self.per_domain
            ],
        }


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else x


def evaluate_scores(
    logits: torch.Tensor,
    labels: torch.Tensor,
    domain: torch.Tensor,
    domain_names: Sequence[str],
    *,
    domains: Sequence[int] | None = None,
) -> EvalMetrics:
    """Per-domain AUC, unweighted mean AUC, WAUC and logloss of one split.

    Args:
        logits: ``[n]`` model logits (float).
        labels: ``[n]`` float in ``{0, 1}``.
        domain: ``[n]`` int64 domain ids.
        domain_names: one name per domain id.
        domains: the domains to report (default: all); the logloss covers the rows of these.

    ``wauc = sum_d n_d * auc_d / sum_d n_d`` over the reported domains that have an AUC, with
    ``n_d`` the rows of domain ``d`` in this split. NaN logits are a ``ValueError``: never
    ranked into an AUC.
    """
    _refuse_nan(logits, "evaluate_scores")
    wanted = range(len(domain_names)) if domains is None else domains
    per_domain: list[DomainMetrics] = []
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for d in wanted:
        rows = domain == d
        keep |= rows
        per_domain.append(
            DomainMetrics(d, domain_names[d], int(rows.sum()), auc(logits[rows], labels[rows]))
        )
    scored = [m for m in per_domain if m.auc is not None]
    if scored:
        mean_auc = sum(m.auc for m in scored if m.auc is not None) / len(scored)
        total = sum(m.n for m in scored)
        wauc = sum(m.n * m.auc for m in scored if m.auc is not None) / total
    else:
        mean_auc = wauc = math.nan
    return EvalMetrics(tuple(per_domain), mean_auc, wauc, logloss(logits[keep], labels[keep]))
