"""Positives-only click logs (Taobao themes, Amazon reviews) to a dataset: ids, negatives, split."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from moefast.config import FeatureSpec
from moefast.data._raw import contiguous
from moefast.data.dataset import MultiDomainDataset
from moefast.data.negatives import sample_negatives
from moefast.data.splits import make_splits

__all__ = ["clicks_to_dataset"]


def clicks_to_dataset(
    name: str,
    user: np.ndarray,
    item: np.ndarray,
    domain: np.ndarray,
    domain_names: tuple[str, ...],
    *,
    embedding_dim: int,
    negative_seed: int,
    split_seed: int,
    info: Mapping[str, object],
    pretrained: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> MultiDomainDataset:
    """Build the dataset from positive rows.

    Args:
        user, item: raw ids (any sortable dtype) ``[n]``; domain: ``int64 [n]`` in
            ``[0, len(domain_names))``, every domain non-empty.
        pretrained: optional ``{"uid"|"item": (raw ids [V], float32 vectors [V, dim])}``; the
            rows of the returned tables follow the contiguous ids (``dataset.pretrained``).

    Features ``uid``, ``item``, ``domain`` get contiguous ids in sorted raw-id order.
    """
    uid, user_values = contiguous(user)
    iid, item_values = contiguous(item)
    num_domains = len(domain_names)
    neg_u, neg_i, neg_d, ratios = sample_negatives(uid, iid, domain, num_domains, negative_seed)
    all_u = np.concatenate([uid, neg_u])
    all_i = np.concatenate([iid, neg_i])
    all_d = np.concatenate([domain, neg_d])
    label = np.concatenate([np.ones(uid.size, np.float32), np.zeros(neg_u.size, np.float32)])
    train, val, test = make_splits({"uid": all_u, "item": all_i, "domain": all_d}, all_d, label, seed=split_seed)
    full_info: dict[str, object] = dict(info)
    full_info.update(
        ctr_ratio=ratios,
        negative_seed=negative_seed,
        split_seed=split_seed,
        domain_rows=np.bincount(all_d, minlength=num_domains).tolist(),
        domain_positives=np.bincount(domain, minlength=num_domains).tolist(),
    )
    tables: dict[str, torch.Tensor] = {}
    if pretrained is not None:
        for feature, values in (("uid", user_values), ("item", item_values)):
            ids, vectors = pretrained[feature]
            order = np.argsort(ids)
            rows = order[np.searchsorted(ids, values, sorter=order)]
            tables[feature] = torch.from_numpy(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    return MultiDomainDataset(
        name=name,
        features=(FeatureSpec("uid", int(user_values.size), embedding_dim),
                  FeatureSpec("item", int(item_values.size), embedding_dim),
                  FeatureSpec("domain", num_domains, embedding_dim)),
        domain_names=domain_names,
        train=train, val=val, test=test,
        info=full_info,
        pretrained=tables,
    )
