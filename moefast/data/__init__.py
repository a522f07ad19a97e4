"""moefast.data: multi-domain datasets, generators, loaders and batching."""

from __future__ import annotations

from moefast.data.dataset import Batch, MultiDomainDataset, Split

__all__: list[str] = ["Batch", "MultiDomainDataset", "Split"]
