"""The streamed tabular source (issue 26): first pass and one streamed epoch of batches against
the in-memory load, on a generated Hive-partitioned Parquet log (``domain=dK/dt=DAY``).

``MOEFAST_BENCH_STREAM_ROWS`` rows, comma-separated (default 1,000,000 and 10,000,000;
``MOEFAST_BENCH_STREAM_50M=1`` adds 50,000,000), the same vocabulary sizes at every size (so that
flat memory is measurable; the tables' bytes are reported apart as ``table_bytes``), cached under
``MOEFAST_BENCH_CACHE`` (default ``~/.cache/moefast/bench``) in a folder named by a fingerprint
of the generator's knobs. Rows/s come from pytest-benchmark; peak RSS per phase is measured in a
subprocess as its ``VmHWM`` (``/proc/self/status``: the peak RSS of the process's own memory,
fresh at ``exec``) and recorded in ``extra_info``. Not ``ru_maxrss``: Linux folds the forking
process's peak into it at ``exec``, so a child of this pytest process reported pytest's RSS
(every earlier phase's data) as its own.

``MOEFAST_BENCH_STREAM_LAYOUT``: ``wide`` (default; 26 fields: 22 categorical with vocabularies
log-spaced from 10 to 100,000 and 4 numeric, dim 16) or ``paper`` (3 fields like the ``paper``
preset: the domain, a 300-id and a 150-id column, dim 8; issue 26's throughput goal).

Training: the staged MoE-MLoRA round of ``bench/test_bench_train.py`` (DeepFM, batch 1024, lazy
Adam, one epoch a stage) streamed and in memory, training rows/s (the median of
``MOEFAST_BENCH_TRAIN_ROUNDS``, default 3, fresh subprocesses) and each one's peak RSS, and the
streamed run under 2 gloo ranks (``--nproc 2``), peak RSS per rank.

Run (no other job on the machine): ``python -m pytest bench/test_bench_stream.py --benchmark-only``.
Check (tiny, no timing): ``MOEFAST_BENCH_STREAM_ROWS=20000 python -m pytest bench/test_bench_stream.py
--benchmark-disable``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SIZES = [int(x) for x in os.environ.get("MOEFAST_BENCH_STREAM_ROWS", "1000000,10000000").split(",")]
if os.environ.get("MOEFAST_BENCH_STREAM_50M") == "1":
    SIZES.append(50_000_000)
LAYOUT = os.environ.get("MOEFAST_BENCH_STREAM_LAYOUT", "wide")
if LAYOUT not in ("wide", "paper"):
    raise ValueError(f"MOEFAST_BENCH_STREAM_LAYOUT={LAYOUT!r}: choose wide or paper")
DOMAINS, DAYS = 10, 5
if LAYOUT == "paper":
    NUMERIC, DIM = 0, 8
    VOCABS = np.array([300, 150], dtype=np.int64)
else:
    NUMERIC, DIM = 4, 16
    VOCABS = np.geomspace(10, 100_000, 22).round().astype(np.int64)
CATEGORICAL = len(VOCABS)
BATCH = 1024
# Training rounds per source (each a fresh subprocess; the machine drifts 10-20% between runs):
# extra_info's train_rows_per_second is their median.
TRAIN_ROUNDS = int(os.environ.get("MOEFAST_BENCH_TRAIN_ROUNDS", "3"))


def _schema() -> dict[str, Any]:
    return {
        "label": "click", "key": "rid", "dim": DIM,
        "domain": {"column": "domain"},
        "categorical": {f"c{j:02d}": {} for j in range(CATEGORICAL)},
        "numeric": {f"n{j}": {"transform": "log1p"} for j in range(NUMERIC)},
        "split": {"kind": "partition", "column": "dt", "last": [f"2026-12-0{DAYS - 2}", f"2026-12-0{DAYS - 1}"]},
    }


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}rows")
def rows(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(scope="module")
def log(rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    knobs = {"rows": rows, "vocabs": VOCABS.tolist(), "numeric": NUMERIC, "domains": DOMAINS, "days": DAYS, "v": 2}
    key = hashlib.sha256(json.dumps(knobs).encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOEFAST_BENCH_CACHE", Path.home() / ".cache" / "moefast" / "bench")) / f"stream-{key}"
    if (root / "_DONE").is_file():
        return root
    rng = np.random.default_rng(0)
    # Per-id effects of each column (spread shrinking with the column count), one per domain last.
    effects = [rng.normal(0, 1.5 / np.sqrt(CATEGORICAL), v) for v in VOCABS] + [rng.normal(0, 0.3, DOMAINS)]
    per = -(-rows // (DOMAINS * DAYS))
    for d in range(DOMAINS):
        for t in range(DAYS):
            cols: dict[str, Any] = {"rid": pa.array([f"r{d}-{t}-{i}" for i in range(per)])}
            logit = np.full(per, -1.5 + effects[-1][d])
            for j, vocab in enumerate(VOCABS):
                ids = np.minimum(rng.zipf(1.2, per), vocab) - 1
                logit += effects[j][ids]
                cols[f"c{j:02d}"] = pa.array(ids).cast(pa.string())
            # Clicks that the ids and the domain predict (a WAUC comparison needs a signal).
            cols["click"] = pa.array((rng.random(per) < 1 / (1 + np.exp(-logit))).astype(np.int8))
            for j in range(NUMERIC):
                cols[f"n{j}"] = pa.array(np.round(rng.lognormal(1.0, 1.0, per), 3))
            sub = root / f"domain=d{d}" / f"dt=2026-12-0{t + 1}"
            sub.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(cols), sub / "part-0.parquet", row_group_size=65_536)
    (root / "_DONE").write_text("")
    return root


_PEAK = """
import json, os, sys, warnings
import torch
import moefast
from moefast import models
from moefast.config import EmbeddingOptimizer, TrainConfig
from moefast.data import firstpass, stream
phase, log, schema, vocab = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
torch.set_num_threads(int(os.environ.get("MOEFAST_BENCH_THREADS", "2")))
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
before = hwm()
out = {}
def train(ds):
    model = models.build("deepfm", ds, "moe-mlora")
    cfg = TrainConfig(max_epochs=1, eval_every=None, batch_size=1024, progress=False,
                      embedding_optimizer=EmbeddingOptimizer.LAZY_ADAM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = moefast.train.fit(model, ds, cfg, backend="fast")
    out["train_rows_per_second"] = result.metrics["train_samples_per_second"]
    out["test_wauc"] = result.metrics["test"]["wauc"]
    out["table_bytes"] = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "tables" in n)
if phase == "firstpass":
    firstpass.first_pass(log, schema, progress=False)
elif phase == "stream":
    ds = stream.open_stream(log, schema, vocab)
    for _ in stream.StreamLoader(ds.train, 1024, generator=0):
        pass
elif phase == "train-stream":
    train(stream.open_stream(log, schema, vocab))
elif phase == "train-memory":
    train(moefast.data.load("table", path=log, schema=schema, vocab_from=vocab, use_cache=False, progress=False))
else:
    moefast.data.load("table", path=log, schema=schema, vocab_from=vocab, use_cache=False, progress=False)
print(json.dumps({"before_kib": before, "peak_kib": hwm(), **out}))
"""

# Two gloo ranks training the streamed log, each printing its own peak RSS (--nproc 2).
_RANKS = """
import datetime, json, os, socket, sys, warnings
import torch, torch.distributed as dist, torch.multiprocessing as mp
def rank(r, port, log, schema, vocab, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": "2",
                       "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3600))
    from moefast import models, train
    from moefast.config import EmbeddingOptimizer, TrainConfig
    from moefast.data import stream
    ds = stream.open_stream(log, json.loads(schema), vocab)
    model = models.build("deepfm", ds, "moe-mlora")
    cfg = TrainConfig(max_epochs=1, eval_every=None, batch_size=1024, progress=False,
                      embedding_optimizer=EmbeddingOptimizer.LAZY_ADAM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.fit(model, ds, cfg, backend="fast")
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.path.join(out, f"rank{r}.json"), "w") as f:
        json.dump({"rank": r, "peak_kib": peak}, f)
    dist.destroy_process_group()
if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.start_processes(rank, args=(port, *sys.argv[1:5]), nprocs=2, join=True, start_method="spawn")
"""


def _peak(phase: str, log: Path, vocab: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _PEAK, phase, str(log), json.dumps(_schema()), str(vocab)],
                         check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def vocab(log: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moefast.data import firstpass

    out = tmp_path_factory.mktemp("stream-vocab") / "vocab.json"
    out.write_text(json.dumps(firstpass.first_pass(log, _schema(), progress=False)))
    return out


def test_first_pass(benchmark: Any, rows: int, log: Path, vocab: Path) -> None:
    from moefast.data import firstpass

    benchmark.pedantic(firstpass.first_pass, args=(log, _schema()), kwargs={"progress": False}, rounds=1, iterations=1)
    benchmark.extra_info.update(rows=rows, **_peak("firstpass", log, vocab))


def test_streamed_epoch(benchmark: Any, rows: int, log: Path, vocab: Path) -> None:
    from moefast.data import stream

    ds = stream.open_stream(log, _schema(), vocab)

    def epoch() -> int:
        return sum(len(b) for b in stream.StreamLoader(ds.train, BATCH, generator=0))

    read = benchmark.pedantic(epoch, rounds=1, iterations=1)
    assert read == len(ds.train)
    benchmark.extra_info.update(rows=rows, train_rows=read, **_peak("stream", log, vocab))


def test_in_memory_load(benchmark: Any, rows: int, log: Path, vocab: Path) -> None:
    import moefast

    benchmark.pedantic(lambda: moefast.data.load("table", path=log, schema=_schema(), vocab_from=vocab,
                                                 use_cache=False, progress=False), rounds=1, iterations=1)
    benchmark.extra_info.update(rows=rows, **_peak("memory", log, vocab))


@pytest.mark.parametrize("source", ["stream", "memory"])
def test_training_round(benchmark: Any, rows: int, log: Path, vocab: Path, source: str) -> None:
    """The staged MoE-MLoRA round, streamed or in memory, in a subprocess: rows/s, test WAUC,
    peak RSS (the in-memory source where it fits), the tables' bytes apart."""
    runs: list[dict[str, Any]] = []
    benchmark.pedantic(lambda: runs.append(_peak(f"train-{source}", log, vocab)), rounds=TRAIN_ROUNDS, iterations=1)
    rates = sorted(r["train_rows_per_second"] for r in runs)
    median = statistics.median(rates)
    benchmark.extra_info.update(runs[-1])
    benchmark.extra_info.update(rows=rows, source=source, train_rows_per_second=median,
                                train_rows_per_second_runs=rates, peak_kib=max(r["peak_kib"] for r in runs))


def test_training_two_ranks(benchmark: Any, rows: int, log: Path, vocab: Path, tmp_path: Path) -> None:
    """``--nproc 2`` on the streamed log: each rank's peak RSS."""
    script = tmp_path / "ranks.py"  # a file: spawned ranks import their function from it
    script.write_text(_RANKS)

    def ranks() -> list[dict[str, int]]:
        subprocess.run([sys.executable, str(script), str(log), json.dumps(_schema()), str(vocab), str(tmp_path)],
                       check=True, capture_output=True, text=True)
        return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    per_rank = benchmark.pedantic(ranks, rounds=1, iterations=1)
    assert len(per_rank) == 2
    benchmark.extra_info.update(rows=rows, peak_kib_per_rank={str(r["rank"]): r["peak_kib"] for r in per_rank})
