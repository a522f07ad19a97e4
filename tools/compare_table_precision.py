"""Accuracy of half tables, paired over seeds: test WAUC with ``--table-precision HALF`` minus
with fp32 tables, the same seed, data and optimizer (lazy Adam) in both arms.

``python tools/compare_table_precision.py [--preset paper] [--precision bf16] [--seeds 5]
[--method base] [--rows N] [--max-epochs N]`` prints each seed's pair, then the mean difference
and its 95% t interval in WAUC points (x100). Issue 28's goal: interval within +-0.3 points,
mean within +-0.1. ``--rows`` / ``--max-epochs`` shrink the run (a check of the script only).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--precision", default="bf16", choices=["fp16", "bf16"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--method", default="base")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--max-epochs", type=int)
    args = parser.parse_args()
    if not 2 <= args.seeds <= 10:
        parser.error("--seeds must be 2 to 10")
    half = TablePrecision(args.precision)
    diffs = []
    for seed in range(1, args.seeds + 1):
        full = wauc(args.preset, TablePrecision.FP32, seed, args.method, args.rows, args.max_epochs)
        low = wauc(args.preset, half, seed, args.method, args.rows, args.max_epochs)
        diffs.append(100 * (low - full))
        print(f"seed {seed}: fp32 {full:.4f}  {args.precision} {low:.4f}  diff {diffs[-1]:+.3f} points", flush=True)
    mean, half_width, _ = t_interval(diffs)
    print(f"{args.preset}, lazy Adam, {args.method}: {args.precision} - fp32 WAUC = {mean:+.3f} points, "
          f"95% interval [{mean - half_width:+.3f}, {mean + half_width:+.3f}] over {len(diffs)} paired seeds")
    print(f"goal (interval within +-0.3, mean within +-0.1): "
          f"{'met' if abs(mean) <= 0.1 and abs(mean) + half_width <= 0.3 else 'not met'}")


if __name__ == "__main__":
    main()
