"""What resuming costs on a preset: the resume snapshot's size and write time, and the hashes a
run computes once (the data's content fingerprint, the initial weights').

``python tools/resume_cost.py PRESET`` (``taobao``, ``paper``, ``wide``): a MoE-MLoRA DeepFM on
the synthetic preset, stopped by ``SIGTERM`` (the test-only fault point) after its first step, so
the snapshot holds the model and the backbone stage's Adam moments (no best weights yet: a
snapshot after an improving epoch adds the stage's trainable tensors once more).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from moefast import data, models
from moefast.config import TrainConfig
from moefast.train import fit
from moefast.runs.writer import FAULT_ENV
from moefast.runs.snapshot import (
    SNAPSHOT,
    Preempted,
    dataset_fingerprint,
    save_snapshot,
    state_fingerprint,
)


def main(preset: str) -> None:
    dataset = data.load("synthetic", preset=preset)
    model = models.build("deepfm", dataset, "moe-mlora", seed=1)
    state_mb = sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 1e6
    t = time.perf_counter()
    dataset_fingerprint(dataset)
    data_s = time.perf_counter() - t
    t = time.perf_counter()
    state_fingerprint(model)
    init_s = time.perf_counter() - t
    out = Path(tempfile.mkdtemp(prefix="moefast-resume-cost-")) / "run"
    os.environ[FAULT_ENV] = "term:step:0:1:1"
    try:
        fit(model, dataset, TrainConfig(max_epochs=1, progress=False), out_dir=out)
    except Preempted:
        pass
    finally:
        del os.environ[FAULT_ENV]
    snapshot = torch.load(out / SNAPSHOT, weights_only=True)
    size_mb = (out / SNAPSHOT).stat().st_size / 1e6
    t = time.perf_counter()
    save_snapshot(out, {key: snapshot[key] for key in ("records", "rng", "stage")})
    write_s = time.perf_counter() - t
    shutil.rmtree(out.parent)
    print(f"{preset}: model state {state_mb:.2f} MB; snapshot {size_mb:.2f} MB written in {write_s:.3f} s; "
          f"data fingerprint {data_s:.3f} s, initial weights' hash {init_s:.3f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "taobao")
