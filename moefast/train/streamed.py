"""What training and evaluation read from a streamed log (:class:`moefast.data.stream.StreamedDataset`).

- :func:`train_loader`: the stage's epochs. The row groups are dealt to ``shards`` shards (the
  dataset's ``shards``, by default one per data-parallel rank); one process reads every shard
  and a rank only its own (``take=[rank]``), so a global batch is the shards' local batches in
  shard order either way, and a 1-process run with the same shard layout computes the same steps
  (docs/distributed.md, "Streamed input").
- :func:`score`: one split's logits in stored order, each rank scoring its own row groups; the
  logits (float32), labels (uint8) and domains (int32) are gathered on every rank: 9 bytes a
  row of the evaluated split, the exact AUC's input (docs/data.md, "Memory"). One process
  writes the test predictions batch by batch while it scores them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from moefast.data.batching import BatchOrder
from moefast.data.stream import StreamedDataset, StreamedSplit, StreamLoader

__all__ = ["score", "shards_of", "train_loader"]


def shards_of(dataset: StreamedDataset, world_size: int) -> int:
    """The shard count of a run of ``world_size`` processes: the dataset's, else one per rank; a
    data-parallel job must have one shard per rank (``ValueError`` otherwise)."""
    shards = dataset.shards or world_size
    if world_size > 1 and shards != world_size:
        raise ValueError(f"dataset {dataset.name!r} is read as {shards} shards, this job has {world_size} ranks: "
                         "each rank reads one shard (open it with shards=None or shards=world size)")
    return shards


def train_loader(dataset: StreamedDataset, batch_size: int, order: BatchOrder, domains: Sequence[int] | None,
                 generator: torch.Generator, rank: int, world_size: int) -> StreamLoader:
    """The training split's epochs for this process (``domains`` None: every domain)."""
    shards = shards_of(dataset, world_size)
    return StreamLoader(dataset.train, batch_size, order=order, shuffle_rows=dataset.shuffle_rows,
                        fragment_order=dataset.fragment_order, domains=domains, generator=generator,
                        shards=shards, take=None if world_size == 1 else [rank], read_ahead=dataset.read_ahead)


def score(model: torch.nn.Module, split: StreamedSplit, domains: Sequence[int] | None, batch_size: int,
          device: torch.device, parallel: Any,
          write: Callable[[Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], None] | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits float32 [n], labels uint8 [n], domains int32 [n])`` of the rows of ``split`` (of
    ``domains``; None: every domain) in eval mode under the tower's current routing, gathered from
    every rank in rank order (one process: the stored order).

    ``write`` (one process only: a data-parallel writer has the other ranks' rows only after
    the gather): called with an iterator of each batch's ``(logits, labels, domains)`` as it is
    scored, which it consumes (``moefast.runs.rundir.write_scored_predictions``). A batch with
    a score that is not finite ends the write (nothing is written) and the scoring goes on, so
    that the caller's check reports every such score."""
    if write is not None and parallel.world_size != 1:
        raise ValueError("scores are written while they are computed by one process only")
    loader = StreamLoader(split, batch_size, order=BatchOrder.SEQUENTIAL, domains=domains,
                          shards=parallel.world_size, take=[parallel.rank], read_ahead=split.source.read_ahead)
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    doms: list[torch.Tensor] = []

    def scored() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            for batch in loader:
                moved = batch.to(device)
                logits.append(model(moved.features, moved.domain).float().cpu())
                labels.append(batch.label.to(torch.uint8))
                doms.append(batch.domain.to(torch.int32))
                yield logits[-1], labels[-1], doms[-1]

    def finite(parts: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for part in parts:
            if not bool(torch.isfinite(part[0]).all()):
                raise _NotFinite
            yield part

    was_training = model.training
    model.eval()
    try:
        rows = scored()
        if write is not None:
            try:
                write(finite(rows))
            except _NotFinite:
                pass  # the rest is scored below; the caller refuses the scores, every one counted
        for _ in rows:
            pass
    finally:
        model.train(was_training)
    mine = (torch.cat(logits) if logits else torch.zeros(0), torch.cat(labels) if labels else
            torch.zeros(0, dtype=torch.uint8), torch.cat(doms) if doms else torch.zeros(0, dtype=torch.int32))
    return parallel.gather_rows(mine[0]), parallel.gather_rows(mine[1]), parallel.gather_rows(mine[2])


class _NotFinite(Exception):
    """A scored batch holds a score that is not finite: its predictions are not written."""
