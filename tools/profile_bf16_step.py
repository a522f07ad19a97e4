"""Where a bf16-mixed training step's time goes, and how fast its wide products run (issue 27).

Runs the staged-training round of ``bench/test_bench_train.py`` (fast backend, MoE-MLoRA on
DeepFM) under ``torch.profiler`` in fp32 and in bf16-mixed, and prints for each:

- the time by op (self CPU time, the top rows), the tower's share (the ``moefast::tower`` node
  forward and backward, everything inside it) and the wide products' share
  (``moefast::mm_bf16`` in bf16-mixed; in fp32 the ``aten::mm``/``addmm`` calls of the same
  shapes inside the tower);
- the wide products' FLOP/s: FLOPs counted analytically from the shapes of the products the
  stage computes (``2 m k n`` each, forward and backward), over their measured time, against
  ``torch.matmul`` of two 2048 x 2048 bf16 matrices timed in the same process (the peak);
- the Amdahl bound of the step from the measured shares: ``1 / (1 - s + s / r)`` with ``s`` the
  wide products' share of the fp32 step and ``r`` their bf16 speed-up, the fp32 time of the same
  products found as the ``aten::mm`` calls with the same operand shapes (matched one for one).

Do not run it while other jobs load the machine (the figures would be wrong):

    .venv/bin/python tools/profile_bf16_step.py --preset wide --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import test_bench_train as bench  # noqa: E402

from moefast.config import Precision  # noqa: E402
from moefast.precision import cpu_flags  # noqa: E402

WIDE = ("moefast::mm_bf16",)


def _peak_bf16(size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size).to(torch.bfloat16)
    b = torch.randn(size, size).to(torch.bfloat16)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _flops(shapes: list[list[int]]) -> float:
    (m, k), (_, n) = shapes[0], shapes[1]
    return 2.0 * m * k * n


def _profile(preset: str, precision: Precision, lazy: bool) -> dict[str, Any]:
    ds = bench._dataset(preset)
    model = bench._model(ds, "fast", lazy=lazy)
    run = bench._staged_round(model, bench._domain_batches(ds, bench.STEPS, bench.BATCH), "fast",
                              precision=precision)
    run()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        samples = run()
        wall = time.perf_counter() - start
    by_op: dict[str, float] = defaultdict(float)
    wide_time = wide_flops = tower_time = 0.0
    mm: list[tuple[tuple[tuple[int, ...], ...], float]] = []  # fp32 products: (operand shapes, time)
    wide_shapes: list[tuple[tuple[tuple[int, ...], ...], float]] = []  # bf16 wide products: (shapes, time)
    for event in prof.events():
        by_op[event.name] += event.self_cpu_time_total
        if event.name in WIDE:
            wide_time += event.cpu_time_total
            wide_flops += _flops(event.input_shapes)
            wide_shapes.append((_key(event.input_shapes), event.cpu_time_total))
        elif event.name == "aten::mm":
            mm.append((_key(event.input_shapes), event.cpu_time_total))
        # The node's forward op and its backward node (the autograd node of the C++ op, or the
        # Python node's backward), not the events nested inside them.
        if event.name == "moefast::tower" or ("TowerFunction" in event.name and "Backward" in event.name) \
                or event.name.startswith("torch::autograd::CppNode<moefast::TowerFunction>"):
            tower_time += event.cpu_time_total
    total = sum(by_op.values())
    return {"wall": wall, "samples": samples, "by_op": by_op, "total_us": total, "wide_us": wide_time,
            "wide_flops": wide_flops, "tower_us": tower_time, "mm": mm, "wide_shapes": wide_shapes}


def _key(shapes: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(s) for s in shapes[:2])


def _same_products(fp32_mm: list[tuple[tuple[tuple[int, ...], ...], float]],
                   wide: list[tuple[tuple[tuple[int, ...], ...], float]]) -> tuple[float, float, int]:
    """The products bf16-mixed computes as wide, found in the fp32 step as the ``aten::mm``
    calls with the same operand shapes, matched one for one: their fp32 time, the bf16 time of
    the same matched products, and how many matched (a product unmatched on either side counts
    on neither)."""
    fp32_by_shape: dict[tuple[tuple[int, ...], ...], list[float]] = defaultdict(list)
    for key, us in fp32_mm:
        fp32_by_shape[key].append(us)
    fp32_us = bf16_us = 0.0
    matched = 0
    for key, us in wide:
        if fp32_by_shape[key]:
            fp32_us += fp32_by_shape[key].pop(0)
            bf16_us += us
            matched += 1
    return fp32_us, bf16_us, matched


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="wide", choices=["paper", "wide"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = cpu_flags() or frozenset()
    print(f"CPU flags: {' '.join(sorted(f for f in flags if f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')))}; "
          f"threads {args.threads}; torch {torch.__version__}")
    lazy = args.preset == "wide"
    results = {p: _profile(args.preset, p, lazy) for p in Precision}
    peak = _peak_bf16()
    print(f"bf16 matmul 2048^3 in this process: {peak / 1e9:.1f} GFLOP/s")
    for prec, r in results.items():
        print(f"\n== {prec.value}: {r['samples'] / r['wall']:.0f} samples/s (under the profiler)")
        for name, us in sorted(r["by_op"].items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {us / r['total_us']:6.1%}  {us / 1e3:9.2f} ms  {name}")
        print(f"  tower node (forward + backward, inclusive): {r['tower_us'] / r['total_us']:.1%} of the step")
        if r["wide_us"]:
            rate = r["wide_flops"] / (r["wide_us"] * 1e-6)
            print(f"  wide products: {r['wide_us'] / r['total_us']:.1%} of the step, {rate / 1e9:.1f} GFLOP/s "
                  f"({rate / peak:.0%} of the 2048^3 bf16 matmul)")
    fp32, bf16 = results[Precision.FP32], results[Precision.BF16_MIXED]
    speedup = (fp32["samples"] / fp32["wall"]) and (bf16["samples"] / bf16["wall"]) / (fp32["samples"] / fp32["wall"])
    print(f"\nbf16-mixed / fp32 samples/s under the profiler: {speedup:.2f}x")
    fp32_wide, bf16_wide, matched = _same_products(fp32["mm"], bf16["wide_shapes"])
    if matched and bf16_wide:
        share = fp32_wide / fp32["total_us"]
        ratio = fp32_wide / bf16_wide
        bound = 1 / (1 - share + share / ratio)
        print(f"wide products: {matched} of {len(bf16['wide_shapes'])} matched by shape in the fp32 step; "
              f"{share:.1%} of the fp32 step; fp32 {fp32_wide / 1e3:.2f} ms -> bf16 {bf16_wide / 1e3:.2f} ms "
              f"= {ratio:.2f}x faster")
        print(f"Amdahl bound of the step from these shares: 1 / (1 - {share:.3f} + {share:.3f} / {ratio:.2f}) "
              f"= {bound:.2f}x; measured {speedup:.2f}x ({speedup / bound:.0%} of the bound)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
