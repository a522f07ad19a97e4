"""Markdown tables for docs/performance.md (and the README's summary) from a ``bench/test_bench_train.py`` result file.

Usage: ``.venv/bin/python bench/report_train.py bench/results/cpu-x86_64-train.json``.
Every figure comes from the JSON (medians); ratios are taken within the one file, so both
sides of a ratio ran in the same process on the same machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text())
    # Only this suite's rows: a result file may also hold other suites' benchmarks.
    return [{**b["extra_info"], "median_s": b["stats"]["median"], "group": b["group"]}
            for b in doc["benchmarks"] if "samples_per_second" in b["extra_info"]]


def throughput_table(rows: list[dict[str, Any]]) -> str:
    """One row per provider; the last column is the fast backend's samples/s over this row's.

    A ``train-<preset>-fit-rows`` group (the same backends on another stage mix) is also
    compared with the peers measured in ``train-<preset>``: samples/s against samples/s.
    """
    lines = ["| workload | provider | embedding optimizer | samples/s | fast / this |",
             "|---|---|---|---:|---:|"]
    for group in sorted({r["group"] for r in rows if r["group"] != "scaling"}):
        members = [r for r in rows if r["group"] == group]
        base = group.removesuffix("-fit-rows")
        if base != group:
            members += [{**r, "provider": f"{r['provider']} (rows of {base})"}
                        for r in rows if r["group"] == base and r["provider"].startswith("deepctr")]
        fast = next((r["samples_per_second"] for r in members if r["provider"] == "fast"), None)
        for r in sorted(members, key=lambda r: r["samples_per_second"]):
            ratio = f"{fast / r['samples_per_second']:.2f}x" if fast else "-"
            opt = r.get("embedding_optimizer", "-")
            lines.append(f"| {group} | {r['provider']} | {opt} | {r['samples_per_second']:,.0f} | {ratio} |")
    return "\n".join(lines)


def scaling_table(rows: list[dict[str, Any]]) -> str:
    members = [r for r in rows if r["group"] == "scaling"]
    base = next((r for r in members if r["batch"] == 1024 and r["num_domains"] == 10
                 and r["experts"] == 1 and r["num_users"] == 300), None)
    lines = ["| batch | domains | experts/domain | users (table rows) | ms / step | samples/s | step time vs base |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in members:
        step_ms = 1e3 * r["median_s"] / r["steps"]
        rel = f"{step_ms / (1e3 * base['median_s'] / base['steps']):.2f}x" if base else "-"
        lines.append(f"| {r['batch']} | {r['num_domains']} | {r['experts']} | {r['num_users']:,} | "
                     f"{step_ms:.2f} | {r['samples_per_second']:,.0f} | {rel} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: report_train.py RESULTS.json")
    rows = _rows(Path(argv[0]))
    print(throughput_table(rows))
    print()
    print(scaling_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
