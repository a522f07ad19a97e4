"""Paired accuracy of bf16-mixed against fp32 (issue 27): WAUC(bf16-mixed) - WAUC(fp32).

On the claims' core setting (``moefast.experiments.claims``: the Taobao-like preset, 20 domains,
diversity 0.8, DeepFM, the default mixed-batch protocol, the claims' training options), for
MLoRA and MoE-MLoRA (specialist gate start), seed by seed: the same seed's dataset, initial
weights and batch order trained twice, once per precision. Prints, per method, the mean and the
95% t-interval of the paired differences in WAUC points (x100), and the goal (interval within
+-0.3 points, mean within +-0.1). Name the protocol of the commit you measure: the claims
options change with the claims issue (``git log -1 moefast/experiments/claims.py``): here the
converged budget with the library's frozen-path dropout (off).

    .venv/bin/python tools/precision_accuracy.py                       # 5 seeds, full size
    .venv/bin/python tools/precision_accuracy.py --seeds 2 --rows 3000 --max-steps 2   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from moefast import models
from moefast.config import BatchMode, GateInit, Precision, TowerConfig, TrainConfig
from moefast.experiments.claims import (
    CONVERGED,
    MLORA,
    MOE_SPECIALIST,
    ClaimsConfig,
    Protocol,
    Setting,
    _load,
)
from moefast.experiments.stats import t_interval
from moefast.train.loop import fit

CORE = Setting("taobao", 20, 0.8)
# The claims' converged budget, mixed batches, frozen-path dropout as the library's default.
PROTOCOL = Protocol(BatchMode.MIXED, CONVERGED, TrainConfig().frozen_path_dropout)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="paired seeds 1..N (default 5)")
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows (default: the claims' 200,000)")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap of a stage (default: the claims')")
    parser.add_argument("--backend", default="fast")
    parser.add_argument("--json", default=None, help="also write the per-seed WAUCs here")
    args = parser.parse_args(argv)
    config = ClaimsConfig(seeds=tuple(range(1, args.seeds + 1)), rows=args.rows, max_steps=args.max_steps,
                          backend=args.backend)
    rows = config.rows_of(CORE)
    per_seed: dict[str, list[dict[str, float]]] = {}
    for variant in (MLORA, MOE_SPECIALIST):
        per_seed[variant.name] = []
        for seed in config.seeds:
            dataset, _, _ = _load(CORE, seed, rows, config)
            wauc = {}
            for precision in Precision:
                model = models.build(config.model, dataset, variant.kind, experts_per_domain=variant.experts_per_domain,
                                     tower_config=TowerConfig(gate_init=variant.gate_init or GateInit.RANDOM),
                                     seed=seed)
                train = dataclasses.replace(config.train_config(seed=seed, protocol=PROTOCOL, seeds_compat=False),
                                            precision=precision)
                wauc[precision.value] = float(fit(model, dataset, train, backend=config.backend).metrics["test"]["wauc"])
            per_seed[variant.name].append(wauc)
            print(f"{variant.name} seed {seed}: fp32 {wauc['fp32']:.4f}, bf16-mixed {wauc['bf16-mixed']:.4f}", flush=True)
    print(f"core setting: {CORE.preset}, {CORE.num_domains} domains, diversity {CORE.diversity}, {config.model}, "
          f"mixed batches, {rows} rows, seeds {list(config.seeds)}")
    for name, runs in per_seed.items():
        mean, half, n = t_interval(100 * (r["bf16-mixed"] - r["fp32"]) for r in runs)
        low, high = mean - half, mean + half
        ok = abs(mean) <= 0.1 and -0.3 <= low and high <= 0.3
        print(f"{name}: WAUC bf16-mixed - fp32 = {mean:+.3f} points, 95% interval [{low:+.3f}, {high:+.3f}] "
              f"(n={n}; goal: interval within +-0.3, mean within +-0.1: {'met' if ok else 'not met'})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(per_seed, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
