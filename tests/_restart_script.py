"""Run by torchrun in tests/test_distributed.py: the parity setting (dense Adam) trained into a run
directory by ``moefast train``'s own code path; on the first attempt rank 1 kills itself in the
middle of stage 1 (``MOEFAST_TEST_FAULT``; ``RESTART_FAULT`` picks another point), torchrun restarts the job (``--max-restarts 1``) and
the ranks resume from rank 0's last snapshot."""

from __future__ import annotations

import os
import sys

import _distributed_worker as worker
import torch

from moefast import models
from moefast.train import distributed, fit

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    parallel = distributed.init_from_env("cpu")
    assert parallel is not None
    if not distributed.restarted() and parallel.rank == 1:
        # Default: stage 1, epoch 2, after its first step; the test also kills at a stage's first
        # step, where the last snapshot was written between stages.
        os.environ["MOEFAST_TEST_FAULT"] = os.environ.get("RESTART_FAULT", "kill:step:1:2:1")
    steps = [0]  # the steps this attempt trains (fewer than the run's after a resume)
    real_step = distributed.DataParallel.train_step

    def counted(self: distributed.DataParallel, *args: object, **kwargs: object) -> float:
        steps[0] += 1
        return real_step(self, *args, **kwargs)  # type: ignore[arg-type]

    distributed.DataParallel.train_step = counted  # type: ignore[method-assign]
    ds = worker.dataset()
    model = models.build("deepfm", ds, "moe-mlora", tower_config=worker.TOWER)
    result = fit(model, ds, worker.config("adam"), backend="fast", out_dir=out, resume=distributed.restarted())
    if parallel.is_writer:
        torch.save({"losses": [s.losses for s in result.stages], "wauc": result.metrics["test"]["wauc"],
                    "restarts": int(os.environ["TORCHELASTIC_RESTART_COUNT"]), "steps": steps[0]}, f"{out}/result-rank0.pt")
    distributed.leave(finished=True)  # as `moefast train` ends a rank's part of the job
