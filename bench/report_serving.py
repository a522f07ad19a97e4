"""Markdown tables for docs/serving.md from a ``bench/test_bench_serving.py`` result file.

Usage: ``.venv/bin/python bench/report_serving.py bench/results/cpu-x86_64-serving.json``.
Every figure comes from the JSON (medians). The first table holds each provider's latency and
throughput (benchmarks run one after another); the second the interleaved ratios to the base
model (every form timed call after call in each round): of the medians over the rounds and of
the fastest rounds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text())
    return [{**b["extra_info"], "median_s": b["stats"]["median"]} for b in doc["benchmarks"]
            if "provider" in b["extra_info"] and "threads" in b["extra_info"]]


def latency_table(rows: list[dict[str, Any]]) -> str:
    """Latency (ms per call) and rows/s per provider, batch and thread count."""
    runs = [r for r in rows if r["provider"] != "interleaved"]
    providers = list(dict.fromkeys(r["provider"] for r in runs))
    columns = sorted({(r["threads"], r["batch"]) for r in runs})
    header = "| provider | embedding lookup | " + " | ".join(f"{t} thr, batch {b}" for t, b in columns) + " |"
    lines = [header, "|---|---|" + "---:|" * len(columns)]
    for provider in providers:
        cells = []
        lookup = "-"
        for threads, batch in columns:
            r = next((r for r in runs if r["provider"] == provider and r["threads"] == threads
                      and r["batch"] == batch), None)
            if r is None:
                cells.append("-")
                continue
            lookup = r["lookup"]
            cells.append(f"{r['latency_ms']:.3f} ms ({r['rows_per_second']:,.0f}/s)")
        lines.append(f"| {provider} | {lookup} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(rows: list[dict[str, Any]]) -> str:
    """Interleaved medians as ratios to the base model."""
    runs = sorted((r for r in rows if r["provider"] == "interleaved"), key=lambda r: (r["threads"], r["batch"]))
    if not runs:
        return "(no interleaved runs in this file)"
    names = [n for n in runs[0]["ratio_to_base"] if n != "base"]
    lines = ["| threads | batch | base, median / fastest (ms) | "
             + " | ".join(f"{n} / base, median / fastest" for n in names) + " |",
             "|---:|---:|---:|" + "---:|" * len(names)]
    for r in runs:
        fastest = r.get("min_ratio_to_base", {})
        cells = [f"{r['ratio_to_base'][n]:.2f}x / {fastest[n]:.2f}x" if n in fastest else f"{r['ratio_to_base'][n]:.2f}x"
                 for n in names]
        base = f"{r['median_ms']['base']:.3f} / {r.get('min_ms', {}).get('base', float('nan')):.3f}"
        lines.append(f"| {r['threads']} | {r['batch']} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    rows = _rows(Path(argv[0]))
    print(latency_table(rows))
    print()
    print(ratio_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
