"""The streamed source's memory bound (issue 26), measured in subprocesses with ``resource``
(``ru_maxrss`` is a process's lifetime peak, so each measurement gets a fresh process).

The bound is the streamed epoch's peak minus its peak before reading: it must stay under
:data:`BOUND_MIB`, what the shuffle buffer, a row group, the read-ahead window and the
allocators' working set take, whatever the rows. The negative control: the same training split
through the in-memory source grows the process by more than that bound, so the test can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moefast.data import firstpass

ROWS = 240_000
ROW_GROUP = 8_000
SHUFFLE_ROWS = 4_000
READ_AHEAD = 1 << 20
# The streamed epoch's growth does not depend on the rows (measured here: 55 MiB after 20
# batches, 67 MiB after 100, 400 or 800, with or without the read-ahead window): the allocators'
# working set, the Parquet reader's and torch's first use and each field's vocabulary as an Arrow
# value set; the buffer, a row group and a batch of encoded rows (56 bytes each) are under 1 MiB,
# the window 1 MiB. The in-memory load of the same 240,000 rows grows the process by about
# 140 MiB.
BOUND_MIB = 96
HERE = Path(__file__).resolve().parent


def _schema() -> dict[str, Any]:
    return {"label": "click", "dim": 4, "domain": {"column": "site"},
            "categorical": {c: {} for c in ("user", "item", "ad", "city", "hour")},
            "numeric": {"price": {"transform": "standardise"}},
            "split": {"kind": "time", "column": "t", "cuts": [0.8, 0.9]}}


def _log(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    for k, site in enumerate("abc"):
        n = ROWS // 3
        cols = {c: pa.array(rng.integers(0, size, n)) for c, size in
                (("user", 50_000), ("item", 20_000), ("ad", 5_000), ("city", 300), ("hour", 24))}
        cols |= {"price": pa.array(rng.lognormal(1, 1, n)), "t": pa.array(rng.random(n)),
                 "click": pa.array((rng.random(n) < 0.2 + 0.1 * k).astype(np.int64))}
        sub = folder / f"site={site}"
        sub.mkdir(parents=True)
        pq.write_table(pa.table(cols), sub / "part-0.parquet", row_group_size=ROW_GROUP)
    return folder


def _peak(mode: str, log: Path, vocab: Path) -> dict[str, int]:
    done = subprocess.run([sys.executable, str(HERE / "_stream_memory.py"), mode, str(log), json.dumps(_schema()),
                           str(vocab), str(SHUFFLE_ROWS), str(READ_AHEAD)],
                          check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_a_streamed_epoch_stays_within_its_bound_and_the_in_memory_load_does_not(tmp_path: Path) -> None:
    log = _log(tmp_path / "log")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(firstpass.first_pass(log, _schema(), progress=False)))
    streamed = _peak("stream", log, vocab)
    memory = _peak("memory", log, vocab)
    assert streamed["rows"] == memory["rows"] > 0.75 * ROWS
    grew = (streamed["peak_kib"] - streamed["before_kib"]) / 1024
    control = (memory["peak_kib"] - memory["before_kib"]) / 1024
    assert grew <= BOUND_MIB, f"the streamed epoch grew the process by {grew:.1f} MiB"
    assert control > BOUND_MIB, f"the in-memory load grew it by {control:.1f} MiB only: the bound tests nothing"
    print(f"streamed {grew:.1f} MiB, in memory {control:.1f} MiB")
