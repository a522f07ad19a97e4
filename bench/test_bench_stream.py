"""The streamed tabular source (issue 26): first pass and one streamed epoch of batches against
the in-memory load, on a generated Hive-partitioned Parquet log (``domain=dK/dt=DAY``).

``MOEFAST_BENCH_STREAM_ROWS`` rows (default 1,000,000; 10,000,000 and 50,000,000 opt in), the
same vocabulary sizes at every size (so that flat memory is measurable), cached under
``MOEFAST_BENCH_CACHE`` (default ``~/.cache/moefast/bench``) in a folder named by a fingerprint
of the generator's knobs. Rows/s come from pytest-benchmark; peak RSS per phase is measured in a
subprocess with ``resource`` (``ru_maxrss``) and recorded in ``extra_info``.

Run (no other job on the machine): ``python -m pytest bench/test_bench_stream.py --benchmark-only``.
Check (tiny, no timing): ``MOEFAST_BENCH_STREAM_ROWS=20000 python -m pytest bench/test_bench_stream.py
--benchmark-disable``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROWS = int(os.environ.get("MOEFAST_BENCH_STREAM_ROWS", "1000000"))
CATEGORICAL, NUMERIC, DOMAINS, DAYS = 22, 4, 10, 5
VOCABS = np.geomspace(10, 100_000, CATEGORICAL).round().astype(np.int64)
BATCH = 1024


def _schema() -> dict[str, Any]:
    return {
        "label": "click", "key": "rid", "dim": 16,
        "domain": {"column": "domain"},
        "categorical": {f"c{j:02d}": {} for j in range(CATEGORICAL)},
        "numeric": {f"n{j}": {"transform": "log1p"} for j in range(NUMERIC)},
        "split": {"kind": "partition", "column": "dt", "last": [f"2026-12-0{DAYS - 2}", f"2026-12-0{DAYS - 1}"]},
    }


@pytest.fixture(scope="module")
def log() -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    knobs = {"rows": ROWS, "vocabs": VOCABS.tolist(), "numeric": NUMERIC, "domains": DOMAINS, "days": DAYS, "v": 1}
    key = hashlib.sha256(json.dumps(knobs).encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOEFAST_BENCH_CACHE", Path.home() / ".cache" / "moefast" / "bench")) / f"stream-{key}"
    if (root / "_DONE").is_file():
        return root
    rng = np.random.default_rng(0)
    per = -(-ROWS // (DOMAINS * DAYS))
    for d in range(DOMAINS):
        for t in range(DAYS):
            cols: dict[str, Any] = {"rid": pa.array([f"r{d}-{t}-{i}" for i in range(per)]),
                                    "click": pa.array((rng.random(per) < 0.2).astype(np.int8))}
            for j, vocab in enumerate(VOCABS):
                cols[f"c{j:02d}"] = pa.array(np.minimum(rng.zipf(1.2, per), vocab) - 1).cast(pa.string())
            for j in range(NUMERIC):
                cols[f"n{j}"] = pa.array(np.round(rng.lognormal(1.0, 1.0, per), 3))
            sub = root / f"domain=d{d}" / f"dt=2026-12-0{t + 1}"
            sub.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(cols), sub / "part-0.parquet", row_group_size=65_536)
    (root / "_DONE").write_text("")
    return root


_PEAK = """
import json, resource, sys
from moefast.data import firstpass, stream
phase, log, schema, vocab = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if phase == "firstpass":
    firstpass.first_pass(log, schema, progress=False)
elif phase == "stream":
    ds = stream.open_stream(log, schema, vocab)
    for _ in stream.StreamLoader(ds.train, 1024, generator=0):
        pass
else:
    import moefast
    moefast.data.load("table", path=log, schema=schema, vocab_from=vocab, use_cache=False, progress=False)
print(json.dumps({"before_kib": before, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
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


def test_first_pass(benchmark: Any, log: Path, vocab: Path) -> None:
    from moefast.data import firstpass

    benchmark.pedantic(firstpass.first_pass, args=(log, _schema()), kwargs={"progress": False}, rounds=1, iterations=1)
    benchmark.extra_info.update(rows=ROWS, **_peak("firstpass", log, vocab))


def test_streamed_epoch(benchmark: Any, log: Path, vocab: Path) -> None:
    from moefast.data import stream

    ds = stream.open_stream(log, _schema(), vocab)

    def epoch() -> int:
        return sum(len(b) for b in stream.StreamLoader(ds.train, BATCH, generator=0))

    rows = benchmark.pedantic(epoch, rounds=1, iterations=1)
    assert rows == len(ds.train)
    benchmark.extra_info.update(rows=ROWS, train_rows=rows, **_peak("stream", log, vocab))


def test_in_memory_load(benchmark: Any, log: Path, vocab: Path) -> None:
    import moefast

    benchmark.pedantic(lambda: moefast.data.load("table", path=log, schema=_schema(), vocab_from=vocab,
                                                 use_cache=False, progress=False), rounds=1, iterations=1)
    benchmark.extra_info.update(rows=ROWS, **_peak("memory", log, vocab))
