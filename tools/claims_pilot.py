"""Choose the expert stages' stopping rule for claims v2 on validation AUC only (issue 24).

Runs MoE-MLoRA (own-expert gate start) on the claims' core setting (synthetic ``taobao``,
20 domains, diversity 0.8, mixed batches) with seeds that the report never uses (101-103), under
the v2 budget (a validation every 100 steps, patience 3 validations, a cap of 20,000 steps, no
epoch cap, no dropout on the frozen path), once per candidate rule, and prints one JSON line per
run: the final model's validation mean AUC over all domains (the gate stage's best; the only
figure the choice reads), and each stage's steps, best step and what stopped it. Test metrics are
not printed: the choice must not see them.

    python tools/claims_pilot.py --rule own-domain --seeds 101 102 103 >> pilot.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moefast import models
from moefast.config import BatchMode, ExpertStopRule, GateInit, PretrainedMode, TowerConfig, TowerKind, TrainConfig
from moefast.data import synthetic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rule", required=True, choices=[r.value for r in ExpertStopRule])
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103])
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from moefast.train.loop import _fit  # no run directory, no test pass needed beyond fit's own

    for seed in args.seeds:
        cfg = synthetic.preset("taobao", seed=seed, rows=200_000, num_domains=20, diversity=0.8)
        dataset = synthetic.generate(cfg)
        model = models.build("deepfm", dataset, TowerKind.MOE_MLORA,
                             tower_config=TowerConfig(gate_init=GateInit.SPECIALIST), seed=seed)
        train = TrainConfig(seed=seed, batch_mode=BatchMode.MIXED, eval_every=args.eval_every, patience=args.patience,
                            max_steps=args.max_steps, max_epochs=None, frozen_path_dropout=False,
                            expert_stop=ExpertStopRule(args.rule), pretrained=PretrainedMode.FROZEN, progress=False)
        start = time.perf_counter()
        result = _fit(model, dataset, train, "fast", None)
        stages = [{k: s[k] for k in ("stage", "steps", "best_step", "stopped_by", "best_val_mean_auc")}
                  for s in result.metrics["stages"]]
        print(json.dumps({"rule": args.rule, "seed": seed, "val_mean_auc": stages[-1]["best_val_mean_auc"],
                          "seconds": round(time.perf_counter() - start, 1), "stages": stages}), flush=True)


if __name__ == "__main__":
    main()
