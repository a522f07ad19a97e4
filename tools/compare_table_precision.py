"""Accuracy of half tables, paired over seeds: test WAUC with ``--table-precision HALF`` minus
with fp32 tables, the same seed, data and optimizer (lazy Adam) in both arms.
``python tools/compare_table_precision.py [--preset paper] [--precision bf16[,fp16]] [--seeds 5]
[--first-seed 1] [--method base] [--rows N] [--max-epochs N]`` prints each seed's pairs, then
per half type the mean difference and its 95% t interval in WAUC points (x100). Issue 28's
goal: interval within +-0.3 points, mean within +-0.1. ``--precision bf16,fp16`` pairs both
half types with one fp32 run per seed; ``--first-seed`` continues a comparison on new seeds
(seeds ``first .. first + seeds - 1``); ``--known FILE`` adds the per-seed lines of an earlier
run's output (the same arms, other seeds) to the intervals. ``--rows`` / ``--max-epochs``
shrink the run (a check of the script only).
"""

from __future__ import annotations

import argparse

from moefast import data, models
from moefast.config import EmbeddingOptimizer, TablePrecision, TrainConfig
from moefast.experiments.stats import t_interval
from moefast.train import fit


def wauc(preset: str, precision: TablePrecision, seed: int, method: str, rows: int | None,
         max_epochs: int | None) -> float:
    options = {"preset": preset, "seed": seed} | ({"rows": rows} if rows else {})
    dataset = data.load("synthetic", **options)
    model = models.build("deepfm", dataset, method, seed=seed)
    config = TrainConfig(seed=seed, progress=False, embedding_optimizer=EmbeddingOptimizer.LAZY_ADAM,
                         table_precision=precision, **({"max_epochs": max_epochs} if max_epochs else {}))
    return float(fit(model, dataset, config, backend="fast").metrics["test"]["wauc"])


def _known(path: str, names: list[str]) -> dict[str, dict[int, float]]:
    """Per-seed differences (points) from an earlier run's output lines
    ``seed S: fp32 X  bf16 Y  diff +D points`` (one half type per line or several)."""
    import re

    out: dict[str, dict[int, float]] = {name: {} for name in names}
    for line in open(path, encoding="utf-8"):
        seed = re.match(r"seed (\d+):", line)
        if seed is None:
            continue
        for name, diff in re.findall(r"(fp16|bf16) [0-9.]+ +diff ([+-][0-9.]+) points", line):
            if name in out:
                out[name][int(seed.group(1))] = float(diff)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--precision", default="bf16", help="bf16, fp16 or bf16,fp16 (one fp32 run per seed)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--known", help="an earlier run's output: its seeds join the intervals")
    parser.add_argument("--method", default="base")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--max-epochs", type=int)
    args = parser.parse_args()
    if not 1 <= args.seeds <= 20 or args.first_seed < 1:
        parser.error("--seeds must be 1 to 20 and --first-seed at least 1")
    names = args.precision.split(",")
    if not names or any(n not in ("fp16", "bf16") for n in names) or len(set(names)) != len(names):
        parser.error(f"--precision takes bf16, fp16 or both, comma-separated; got {args.precision!r}")
    diffs = _known(args.known, names) if args.known else {name: {} for name in names}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        full = wauc(args.preset, TablePrecision.FP32, seed, args.method, args.rows, args.max_epochs)
        parts = [f"seed {seed}: fp32 {full:.4f}"]
        for name in names:
            low = wauc(args.preset, TablePrecision(name), seed, args.method, args.rows, args.max_epochs)
            diffs[name][seed] = 100 * (low - full)
            parts.append(f"{name} {low:.4f}  diff {diffs[name][seed]:+.3f} points")
        print("  ".join(parts), flush=True)
    for name in names:
        values = [diffs[name][s] for s in sorted(diffs[name])]
        if len(values) < 2:
            print(f"{name}: one seed, no interval")
            continue
        mean, half_width, _ = t_interval(values)
        print(f"{args.preset}, lazy Adam, {args.method}: {name} - fp32 WAUC = {mean:+.3f} points, "
              f"95% interval [{mean - half_width:+.3f}, {mean + half_width:+.3f}] over {len(values)} paired seeds "
              f"({sum(v > 0 for v in values)} favour {name})")
        print(f"goal (interval within +-0.3, mean within +-0.1): "
              f"{'met' if abs(mean) <= 0.1 and abs(mean) + half_width <= 0.3 else 'not met'}")


if __name__ == "__main__":
    main()
