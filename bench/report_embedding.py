"""docs/performance.md's sparse-embedding table from ``bench/test_bench_embedding.py`` result files.

Usage: ``.venv/bin/python bench/report_embedding.py RESULTS_2THREADS.json RESULTS_1THREAD.json``.
Ratio = peer median / moefast median (above 1: moefast is faster); both sides of a ratio come
from the same file, so they ran in the same process on the same tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (mode, ours, peer): the comparisons docs/performance.md reports.
PAIRS = [
    ("forward", "moefast", "torch"),
    ("forward", "moefast", "fbgemm"),
    ("train_step", "moefast-rowwise-adagrad", "fbgemm-rowwise-adagrad"),
    ("train_step", "moefast-rowwise-adagrad", "torch-sparse-SparseAdam"),
    ("train_step", "moefast-lazy-adam", "torch-sparse-SparseAdam"),
    ("train_step", "moefast-rowwise-adagrad", "torch-dense-Adam"),
]
WORKLOADS = ("d16", "d64")


def _medians(path: Path) -> dict[tuple[str, str, str], float]:
    doc = json.loads(path.read_text())
    out = {}
    for b in doc["benchmarks"]:
        info = b["extra_info"]
        if "workload" in info and "mode" in info:
            out[(info["mode"], info["provider"], info["workload"])] = b["stats"]["median"]
    return out


def table(paths: list[Path], labels: list[str]) -> str:
    runs = [_medians(p) for p in paths]
    head = "| mode | ours | peer | " + " | ".join(f"{w}, {lab}" for lab in labels for w in WORKLOADS) + " |"
    lines = [head, "|" + "---|" * (3 + len(labels) * len(WORKLOADS))]
    for mode, ours, peer in PAIRS:
        cells = []
        for run in runs:
            for w in WORKLOADS:
                a, b = run.get((mode, ours, w)), run.get((mode, peer, w))
                cells.append(f"{b / a:.2f}x ({1e3 * a:.1f} vs {1e3 * b:.1f} ms)" if a and b else "n/a")
        lines.append(f"| {mode} | {ours} | {peer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: report_embedding.py RESULTS.json [RESULTS.json ...]")
    paths = [Path(a) for a in argv]
    labels = []
    for p in paths:
        threads = {b["extra_info"].get("threads") for b in json.loads(p.read_text())["benchmarks"]}
        labels.append("/".join(f"{t} thr" for t in sorted(t for t in threads if t is not None)))
    print(table(paths, labels))


if __name__ == "__main__":
    main(sys.argv[1:])
