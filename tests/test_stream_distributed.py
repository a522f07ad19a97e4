"""Two gloo ranks training on a streamed log (issue 26): each reads its own share of the row
groups (disjoint, their union the split), both take the same steps, and they compute the
function one process computes when it reads the same two shards itself: per-step loss within
1e-5 relative, test WAUC within 0.002 (the data-parallel tolerances of tests/test_distributed.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _stream_data import stream_schema, write_log
from _stream_worker import run, train

from moefast.data import firstpass, stream

LOSS_RTOL = 1e-5
WAUC_ATOL = 0.002


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_ranks_reading_their_own_shards_match_one_process_reading_both(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log", n=900, row_group=40)
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(firstpass.first_pass(log, stream_schema(), progress=False)))
    ranks_run = mp.start_processes(run, args=(2, _free_port(), str(tmp_path), str(log), json.dumps(stream_schema()),
                                              str(vocab)), nprocs=2, join=False, start_method="spawn")
    # The one process trains while the ranks start (importing torch is most of their time).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(log, stream_schema(), vocab, shards=2)
    finally:
        torch.set_num_threads(threads)
        while not ranks_run.join():
            pass
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # Each epoch (of each stage, and each domain of an expert's): the ranks read disjoint shares
    # of the row groups, the ones the single process reads as its two shards.
    assert len(ranks[0]["read"]) == len(ranks[1]["read"]) == len(one["read"]) // 2
    for k, (a, b) in enumerate(zip(ranks[0]["read"], ranks[1]["read"], strict=True)):
        assert a and b and not set(a) & set(b)
        assert (a, b) == (one["read"][2 * k], one["read"][2 * k + 1])
    every = {f"{u.path}:{u.group}" for u in stream.open_stream(log, stream_schema(), vocab).train.units()}
    assert set(ranks[0]["read"][0]) | set(ranks[1]["read"][0]) == every  # the backbone's first epoch
    for label, ref in one["losses"].items():
        for r in ranks:  # the same steps on every rank, the global batch's loss
            assert len(r["losses"][label]) == len(ref) > 0, label
        assert ranks[0]["losses"][label] == ranks[1]["losses"][label]
        got = torch.tensor(ranks[0]["losses"][label], dtype=torch.float64)
        want = torch.tensor(ref, dtype=torch.float64)
        assert float(((got - want).abs() / want.abs()).max()) <= LOSS_RTOL, label
    assert ranks[0]["samples"] == one["samples"]
    assert abs(ranks[0]["wauc"] - one["wauc"]) <= WAUC_ATOL
    # The control: read as one shard, the same epoch gives other global batches (another row
    # order), so the match above is the shard layout's, not any stream's.
    ds = stream.open_stream(log, stream_schema(), vocab, shuffle_rows=120)
    one_shard = next(iter(stream.StreamLoader(ds.train, 64, shuffle_rows=120, generator=1)))
    two_shards = next(iter(stream.StreamLoader(ds.train, 64, shuffle_rows=120, generator=1, shards=2)))
    assert not torch.equal(one_shard.features["user"], two_shards.features["user"])
