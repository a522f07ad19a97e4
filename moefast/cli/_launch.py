"""``moefast train --nproc N``: the run handed to torchrun's elastic launcher.

The launcher writes the resolved configuration to a TOML file and starts
``torchrun --standalone --nproc-per-node N -m moefast train --config FILE --out DIR``; every
worker then joins the process group (:func:`moefast.train.parallel.data_parallel.init_from_env`) and trains
its slice of each global batch. torchrun sets ``OMP_NUM_THREADS=1`` in its workers; each rank's
threads are set here to the machine's cores divided by ``N`` (``MOEFAST_THREADS_PER_RANK``
overrides it). ``SIGTERM`` to the command (or to any rank) stops every rank at the same step
boundary, rank 0 saving the run there, and the command exits with status 143.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import tempfile
from pathlib import Path

from moefast.cli._options import UserError
from moefast.config import RunConfig
from moefast.runs.files import CONFIG_TOML
from moefast.runs.snapshot import PREEMPTED_STATUS
from moefast.runs.writer import write_text

__all__ = ["launch", "torchrun_argv"]


def torchrun_argv(
    nproc: int, config_file: Path, out: Path, *, overwrite: bool, quiet: bool, resume: bool = False
) -> list[str]:
    """torchrun's arguments for ``nproc`` workers on this machine (loopback rendezvous); with
    ``resume`` the workers continue the run ``out`` with its recorded options."""
    argv = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "-m", "moefast", "train"]
    argv += ["--resume", str(out)] if resume else ["--config", str(config_file), "--out", str(out)]
    if overwrite and not resume:
        argv.append("--overwrite")
    if quiet:
        argv.append("--quiet")
    return argv


def launch(config: RunConfig, config_text: str, quiet: bool, nproc: int, *, resume: bool = False) -> int:
    """Run ``config`` (``config_text``: it as ``moefast train``'s TOML) data-parallel on ``nproc``
    local processes (``resume``: continue the run directory ``config.out``); the exit status."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise UserError(f"--nproc must be a positive whole number, got {nproc!r}")
    if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ:
        raise UserError("--nproc inside a torchrun job: run `moefast train` there without --nproc")
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if config.train.device.startswith("cuda") and torch.cuda.device_count() < nproc:
        raise UserError(f"--nproc {nproc} with --device {config.train.device}: only "
                        f"{torch.cuda.device_count()} CUDA devices here (one per rank)")
    out = Path(config.out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    check_run_dir(out, overwrite=config.overwrite, resume=resume)
    os.environ.setdefault("MOEFAST_THREADS_PER_RANK", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="moefast-launch-") as tmp:
        config_file = Path(tmp) / CONFIG_TOML
        write_text(config_file, config_text)
        try:
            torchrun(torchrun_argv(nproc, config_file, out, overwrite=config.overwrite, quiet=quiet, resume=resume))
        except ChildFailedError as exc:
            codes = {f.exitcode for f in exc.failures.values()}
            # A preempted rank exits 143; torchrun then sends SIGTERM to the ranks still running
            # (-15 if one was already past its own handler).
            if PREEMPTED_STATUS in codes and codes <= {PREEMPTED_STATUS, -signal.SIGTERM}:
                return _preempted(out, nproc, "a rank was sent SIGTERM")
            rank, failure = exc.get_first_failure()
            raise UserError(f"rank {rank} of {nproc} exited with status {failure.exitcode} "
                            "(its message is above); every rank was stopped") from None
        except SignalException as exc:
            if exc.sigval != signal.SIGTERM:
                # SIGINT (Ctrl-C): the ranks were interrupted where they were, not at a step
                # boundary; what the last snapshot holds is what --resume continues.
                saved = "the ranks stopped where they were; the run's last snapshot is what resumes"
                print(f"moefast: interrupted; {_continue(out, nproc, saved)}", file=sys.stderr)
                return 130
            # torchrun passed the signal on to every rank and waited for them: each stopped at
            # the same step boundary, rank 0 saving the run there.
            return _preempted(out, nproc, "this command was sent SIGTERM")
    return 0


def check_run_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an unusable run directory before any rank starts (a file, unwritable, a folder
    that is not a run, another run without ``--overwrite``, one in use): rank 0 claims it again,
    the others would otherwise die in a collective waiting for it. The claim is released at
    once; a directory it created is removed again."""
    from moefast.runs.rundir import RunDirectoryError, claim_run_dir

    try:
        claim_run_dir(out, overwrite=overwrite, resume=resume).release()
    except RunDirectoryError as exc:
        raise UserError(f"{'--resume' if resume else '--out'}: {exc}") from None


def _continue(out: Path, nproc: int, saved: str) -> str:
    """How to continue the run ``out`` (``saved``: what was kept), or that it saved nothing."""
    if (out / CONFIG_TOML).is_file():  # written before training starts; --resume takes it
        return f"{saved}; continue it with `moefast train --resume {out} --nproc {nproc}`"
    return f"nothing was saved in {str(out)!r} yet (stopped before training began); start it again"


def _preempted(out: Path, nproc: int, why: str) -> int:
    saved = "the ranks stopped at the same step boundary and rank 0 saved the run there"
    print(f"moefast: stopped: {why}; {_continue(out, nproc, saved)}", file=sys.stderr)
    return PREEMPTED_STATUS
