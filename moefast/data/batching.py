"""Mini-batches from a :class:`Split`: the method's domain-by-domain order, mixed, sequential.

All row selection is done with index arrays built once per epoch (one permutation per domain,
one gather per column per batch); nothing iterates over rows in Python, so batching stays a
small fraction of a training step on two CPU cores.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from moefast.data.dataset import Batch, Split

__all__ = ["BatchLoader", "BatchOrder"]


class BatchOrder(enum.Enum):
    """How an epoch visits the rows.

    ``BY_DOMAIN`` (the method's default): every batch holds one domain's rows; each epoch
    shuffles the order of the domains and the rows inside each domain, then runs all batches of
    one domain before the next. ``MIXED``: rows of all (selected) domains shuffled together;
    batches carry per-sample domain ids. ``SEQUENTIAL``: no shuffle, rows in stored order
    (evaluation); the generator is not used.
    """

    BY_DOMAIN = "by-domain"
    MIXED = "mixed"
    SEQUENTIAL = "sequential"


class BatchLoader:
    """Iterate over a split in batches; each ``iter()`` is one epoch.

    Args:
        split: the rows to batch.
        batch_size: rows per batch (the last batch of a domain, or of the epoch, may be
            smaller unless ``drop_last``).
        order: see :class:`BatchOrder`.
        domains: restrict the epoch to these domain ids (e.g. expert ``i`` trains on domain
            ``i % D`` only); ``None`` keeps every domain present in the split. In ``BY_DOMAIN``
            order the given domains are still shuffled each epoch.
        generator: a ``torch.Generator`` (advanced by every epoch) or an int seed; ``None``
            seeds a private generator with 0. Same seed, same sequence of epochs.
        drop_last: drop each domain's (``BY_DOMAIN``) or the epoch's incomplete last batch.

    Batches are :class:`Batch` es of CPU tensors: ``features[name]`` ``int64 [B]`` or
    ``[B, L]`` (``float32 [B]`` for a numeric field), ``domain`` ``int64 [B]``, ``label``
    ``float32 [B]``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        order: BatchOrder = BatchOrder.BY_DOMAIN,
        *,
        domains: Sequence[int] | None = None,
        generator: torch.Generator | int | None = None,
        drop_last: bool = False,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(order, BatchOrder):
            raise TypeError(f"order must be a BatchOrder, got {order!r}")
        self.split = split
        self.batch_size = batch_size
        self.order = order
        self.drop_last = drop_last
        if isinstance(generator, torch.Generator):
            self.generator = generator
        elif generator is None or (isinstance(generator, int) and not isinstance(generator, bool)):
            self.generator = torch.Generator().manual_seed(0 if generator is None else generator)
        else:
            raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")

        dom = split.domain
        # Rows grouped by domain, in stored order inside each domain (stable sort).
        by_domain = torch.argsort(dom, stable=True)
        num = int(dom.max()) + 1 if len(split) else 0
        counts = torch.bincount(dom, minlength=num).tolist()
        rows_of = dict(enumerate(torch.split(by_domain, counts)))
        if domains is None:
            chosen = [d for d, c in enumerate(counts) if c > 0]
        else:
            chosen = []
            for d in domains:
                if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                    raise ValueError(f"domain ids must be non-negative ints, got {d!r}")
                if d in chosen:
                    raise ValueError(f"domain {d} listed twice in domains={list(domains)}")
                chosen.append(d)
        self.domains: tuple[int, ...] = tuple(chosen)
        empty = torch.zeros(0, dtype=torch.int64)
        # A selected domain absent from the split simply contributes no rows.
        self._rows: dict[int, torch.Tensor] = {d: rows_of.get(d, empty) for d in chosen}
        if domains is None:
            self._all = torch.arange(len(split))
        else:
            self._all = torch.sort(torch.cat([self._rows[d] for d in chosen] or [empty])).values

    @property
    def num_rows(self) -> int:
        """Rows visited per epoch (before ``drop_last``)."""
        return int(self._all.numel())

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.order is BatchOrder.BY_DOMAIN:
            return sum(self._count(int(r.numel())) for r in self._rows.values())
        return self._count(self.num_rows)

    def _count(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _chunks(self, index: torch.Tensor) -> Iterator[torch.Tensor]:
        n = int(index.numel())
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            yield index[start : start + self.batch_size]

    def _epoch_rng(self) -> np.random.Generator:
        # One draw from the torch generator seeds the epoch; the permutations themselves run in
        # numpy, single-threaded. torch's randperm and large index ops open parallel regions,
        # and on two oversubscribed cores each region waited for a thread wake-up: an epoch of
        # the `paper` train split took about 140 ms that way instead of about 10 ms.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return np.random.default_rng(seed)

    def __iter__(self) -> Iterator[Batch]:
        if self.order is BatchOrder.SEQUENTIAL:
            for chunk in self._chunks(self._all):
                yield self.split.rows(chunk)
        elif self.order is BatchOrder.MIXED:
            rng = self._epoch_rng()
            everything = self._all.numpy()
            for chunk in self._chunks(torch.from_numpy(everything[rng.permutation(everything.size)])):
                yield self.split.rows(chunk)
        else:
            # The whole epoch's order is drawn up front, so the generator advances by the same
            # amount however far the consumer iterates.
            rng = self._epoch_rng()
            plan = []
            for k in rng.permutation(len(self.domains)).tolist():
                mine = self._rows[self.domains[k]].numpy()
                plan.append(torch.from_numpy(mine[rng.permutation(mine.size)]))
            for rows in plan:
                for chunk in self._chunks(rows):
                    yield self.split.rows(chunk)
