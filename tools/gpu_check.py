"""``make gpu-check OUT=DIR``: everything a lent GPU should run, in one call (issue 27).

Parts, each under its own time limit (the whole stays under 8 minutes on one H100):

1. build: ``pip install --no-build-isolation -e .`` into the running Python (the GPU image's
   torch; the C++ tower node is built where that torch allows);
2. every ``gpu``-marked test (``pytest -m gpu``), results as JUnit XML;
3. the GPU benchmarks: the adapter tower against its loop and concatenated forms
   (``bench/test_bench_adapter.py::test_adapter_tower``), and staged training in fp32 and
   bf16-mixed against the reference (``bench/test_bench_train.py::test_train``, equal-steps);
4. ``DIR/summary.md``: the GPU's name, pass/fail per part, the ratios.

Without CUDA it says so in one line and exits 0.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Seconds per part: 60 + 180 + 90 + 120 = 450 s of work, under the 8 minutes with start-up.
LIMITS = {"build": 60, "gpu-tests": 180, "bench-adapter": 90, "bench-train": 120}


def _run(name: str, command: list[str], out: Path) -> dict[str, Any]:
    start = time.monotonic()
    log = out / f"{name}.log"
    try:
        with log.open("w") as handle:
            proc = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=LIMITS[name], check=False)
        status = "pass" if proc.returncode == 0 else f"fail (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {LIMITS[name]} s"
    return {"part": name, "status": status, "seconds": round(time.monotonic() - start, 1), "log": log.name}


def _junit(path: Path) -> str:
    if not path.exists():
        return "no report"
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "no report"
    get = lambda key: int(suite.get(key, 0))  # noqa: E731
    return (f"{get('tests')} tests: {get('tests') - get('failures') - get('errors') - get('skipped')} passed, "
            f"{get('failures')} failed, {get('errors')} errors, {get('skipped')} skipped")


def _medians(path: Path) -> list[tuple[dict[str, Any], float]]:
    if not path.exists():
        return []
    rows = json.loads(path.read_text()).get("benchmarks", [])
    return [({**b.get("params", {}), **b.get("extra_info", {}), "group": b.get("group")}, b["stats"]["median"])
            for b in rows if b.get("stats")]


def _adapter_ratios(path: Path) -> list[str]:
    by_case: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for info, median in _medians(path):
        by_case[(str(info.get("workload")), str(info.get("mode")))][str(info.get("provider"))] = median
    lines = []
    for (workload, mode), times in sorted(by_case.items()):
        fast = times.get("fast")
        if fast:
            ratios = ", ".join(f"{p}/fast {t / fast:.2f}x" for p, t in sorted(times.items()) if p != "fast")
            lines.append(f"- {workload} {mode}: {ratios}")
    return lines


def _train_ratios(path: Path) -> list[str]:
    times: dict[tuple[str, str, str], float] = {}
    for info, median in _medians(path):
        times[(str(info.get("preset")), str(info.get("provider")), str(info.get("precision")))] = median
    lines = []
    for preset in sorted({k[0] for k in times}):
        get = lambda provider, prec: times.get((preset, provider, prec))  # noqa: E731,B023
        parts = []
        for prec in ("fp32", "bf16-mixed"):
            fast, ref = get("fast", prec), get("reference", prec)
            if fast and ref:
                parts.append(f"{prec}: fast {ref / fast:.2f}x the reference")
        f32, b16 = get("fast", "fp32"), get("fast", "bf16-mixed")
        if f32 and b16:
            parts.append(f"fast bf16-mixed {f32 / b16:.2f}x fast fp32")
        lines.append(f"- {preset}: " + "; ".join(parts))
    return lines


def main(argv: list[str]) -> int:
    try:
        import torch
    except ImportError:
        print(f"gpu-check: torch is not importable by {sys.executable}; no CUDA device to check")
        return 0
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check")
        return 0
    out = Path(argv[0] if argv else "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    parts = [
        _run("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], out),
        _run("gpu-tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider",
                           f"--junitxml={out / 'gpu-tests.xml'}"], out),
        _run("bench-adapter", [py, "-m", "pytest", "-q", "bench/test_bench_adapter.py", "-k", "test_adapter_tower and not cpu",
                               "--benchmark-only", f"--benchmark-json={out / 'bench-adapter.json'}"], out),
        _run("bench-train", [py, "-m", "pytest", "-q", "bench/test_bench_train.py", "-k", "test_train and equal-steps",
                             "--benchmark-only", f"--benchmark-json={out / 'bench-train.json'}"], out),
    ]
    lines = [f"# gpu-check: {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}", "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} |" for p in parts]
    lines += ["", f"gpu tests: {_junit(out / 'gpu-tests.xml')}", "", "## adapter tower (median time ratios)", ""]
    lines += _adapter_ratios(out / "bench-adapter.json") or ["- no results"]
    lines += ["", "## staged training (samples/s ratios)", ""]
    lines += _train_ratios(out / "bench-train.json") or ["- no results"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(p["status"] == "pass" for p in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
