"""Data-parallel training (issue 19): 2 gloo processes against 1 process at the same global batch.

The parity case (tests/_distributed_worker.py): DeepFM with a MoE-MLoRA tower (5 stages), 3
domains, dropout on, 2 epochs per stage without early stopping, under dense Adam, lazy Adam and
row-wise Adagrad. Per-step losses agree within a relative 1e-5 for the first 50 steps of every
stage (the issue's tolerance: float reduction order is the only difference), the test WAUC within
0.002, and the replicated tables, parameters and optimizer states are bitwise equal across ranks.
One expert stage ends on a 1-row global batch (rank 1's slice is empty). About 30 s on 2 cores.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import _distributed_worker as worker
import pytest
import torch
import torch.multiprocessing as mp

from moefast.data.dataset import Batch
from moefast.nn.adapter import AdapterLinear, global_batch_rows
from moefast.testing import tolerance
from moefast.train.parallel.data_parallel import (
    collective_timeout,
    shard_bounds,
    slice_batch,
    threads_per_rank,
)

LOSS_RTOL = 1e-5  # the fixed tolerance on the per-step loss
WAUC_ATOL = 0.002
COMPARED_STEPS = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(tmp_path: Path, world_size: int, device: str) -> list[dict[str, Any]]:
    mp.start_processes(worker.run, args=(world_size, _free_port(), str(tmp_path), device),
                       nprocs=world_size, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs across ranks"


def _check_parity(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    for name in worker.OPTIMIZERS:
        one, many = single[name], ranks[0]["fit"][name]
        assert many["labels"] == one["labels"]
        for label, mine, ref in zip(one["labels"], many["losses"], one["losses"], strict=True):
            assert len(mine) == len(ref), f"{name} {label}: {len(mine)} steps vs {len(ref)}"
            got = torch.tensor(mine[:COMPARED_STEPS], dtype=torch.float64)
            want = torch.tensor(ref[:COMPARED_STEPS], dtype=torch.float64)
            rel = ((got - want).abs() / want.abs()).max()
            # bf16 tables: a last-bit difference of a summed float32 gradient (the ranks sum in
            # another order) can move a stochastically rounded element by one bf16 ulp, so the
            # loss is held to the bf16 table's tolerance; the ranks still agree bit for bit.
            rtol = tolerance(torch.bfloat16).rtol if name.endswith("-bf16") else LOSS_RTOL
            assert rel <= rtol, f"{name} {label}: per-step loss rel diff {float(rel):.3g}"
        assert abs(many["wauc"] - one["wauc"]) <= WAUC_ATOL, (name, many["wauc"], one["wauc"])
        for other in ranks[1:]:
            _assert_bitwise_equal(many["state"], other["fit"][name]["state"], f"{name} after fit")
            assert other["fit"][name]["losses"] == many["losses"]


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return worker.train_all("cpu")


def test_two_gloo_ranks_match_one_process(tmp_path: Path, single: dict[str, Any]) -> None:
    ranks = _run_ranks(tmp_path, 2, "cpu")
    _check_parity(ranks, single)

    # The expert stage of domain 2 ends on a 1-row global batch: rank 1 trained on nothing there.
    counts = worker.dataset().train.domain_counts(3).tolist()
    assert counts[2] % worker.config("adam").batch_size == 1

    # Bytes per step: dense Adam all-reduces the tables, the fused optimizers exchange rows.
    adam, lazy = ranks[0]["fit"]["adam"]["distributed"], ranks[0]["fit"]["lazy-adam"]["distributed"]
    assert adam["world_size"] == 2
    assert adam["bytes_per_step"]["sparse"] == 0 < lazy["bytes_per_step"]["sparse"]
    assert adam["bytes_per_step"]["dense"] > lazy["bytes_per_step"]["dense"]

    # Replicated state after synchronised steps by hand: parameters, buffers (the fused
    # optimizer's) and the dense Adam's moments, bitwise equal on both ranks.
    for name in ("adam", "lazy-adam"):
        a, b = ranks[0]["hand"][name], ranks[1]["hand"][name]
        assert len(a["losses"]) == worker.HAND_STEPS and a["losses"] == b["losses"]
        _assert_bitwise_equal(a["state"], b["state"], f"{name} by hand")
        assert a["adam"].keys() == b["adam"].keys() and a["adam"]
        for key in a["adam"]:
            _assert_bitwise_equal(a["adam"][key], b["adam"][key], f"{name} Adam state {key}")
    assert any(k.endswith("exp_avg") for k in ranks[0]["hand"]["lazy-adam"]["state"])

    # The row exchange: the union of the ranks' rows, gradients summed and divided by 2
    # (TorchRec's convention), the same on both ranks. Lazy Adam and row-wise Adagrad barely
    # see a gradient's scale (only through eps), so the parity above cannot check the division.
    for rank in ranks:
        (rows0, grads0), (rows1, grads1) = rank["exchange"]
        assert rows0.tolist() == [0, 1, 2, 5]
        assert grads0.tolist() == [[0.5, 0.5], [1.0, 1.0], [1.5, 1.5], [1.5, 1.5]]
        assert rows1.tolist() == [7] and grads1.tolist() == [[5.0]]

    # A failing rank stops every rank, each with the failing rank's message.
    for rank in ranks:
        bad, nan = rank["failures"]["bad_id"], rank["failures"]["nan"]
        assert bad.startswith("RankFailedError: rank 1 of 2 failed: ValueError") and "1000000000" in bad
        assert nan.startswith("NonFiniteError: nan: the training loss is nan")
        assert rank["failures"]["once"] == "ZeroDivisionError: division by zero"


@pytest.mark.parametrize("fault", ["kill:step:1:2:1", "kill:step:2:1:1"], ids=["mid-stage", "stage-boundary"])
def test_torchrun_restart_resumes_from_rank0_snapshot(tmp_path: Path, single: dict[str, Any], fault: str) -> None:
    """Rank 1 dies in stage 1's second epoch (the snapshot is mid-stage), or at stage 2's first
    step (the last snapshot was written between stages 1 and 2); torchrun restarts both ranks,
    which resume from rank 0's snapshot and end as the uninterrupted run does. (At a stage
    boundary, rank 1 once reloaded at the end a checkpoint that only rank 0 writes.)"""
    script = Path(__file__).parent / "_restart_script.py"
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")]),
           "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(
        # The c10d rendezvous, as `moefast train --nproc` uses (docs/distributed.md, "Restarts").
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", str(script), str(out)],
        env={**env, "MOEFAST_COLLECTIVE_TIMEOUT": "60", "RESTART_FAULT": fault}, capture_output=True, text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out / "result-rank0.pt", weights_only=False)
    assert result["restarts"] == 1
    # The restarted attempt trained only what the snapshot had not: stage 0 and the first epoch
    # of stage 1 (mid-stage), or stages 0 and 1 (stage boundary), came from rank 0's snapshot.
    losses = result["losses"]
    trained_before = len(losses[0]) + (len(losses[1]) // 2 if fault == "kill:step:1:2:1" else len(losses[1]))
    assert result["steps"] == sum(len(losses) for losses in result["losses"]) - trained_before
    ref = single["adam"]
    for mine, want in zip(result["losses"], ref["losses"], strict=True):
        assert len(mine) == len(want)
        got, expect = torch.tensor(mine, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
        assert float(((got - expect).abs() / expect.abs()).max()) <= LOSS_RTOL
    assert abs(result["wauc"] - ref["wauc"]) <= WAUC_ATOL


def test_moefast_train_nproc(tmp_path: Path) -> None:
    """`moefast train --nproc 2`: a rank that dies makes the command exit non-zero, naming it;
    `--resume DIR --nproc 2` continues the run data-parallel, rank 0 alone writing (one table,
    metrics.json with the world size and bytes per step), and it ends as one process does."""
    from moefast import cli

    flags = ["--rows", "1200", "--num-domains", "2", "--method", "base", "--max-epochs", "1", "--batch-size", "256",
             "--quiet"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    dead = subprocess.run(
        [sys.executable, "-m", "moefast", "train", "--nproc", "2", *flags, "--out", str(tmp_path / "dead")],
        env={**env, "MOEFAST_TEST_FAULT": "kill:step:0:1:1"}, capture_output=True, text=True, timeout=180,
    )
    assert dead.returncode == 2
    assert re.search(r"moefast: error: rank [01] of 2 exited with status -9", dead.stderr), dead.stderr[-3000:]

    again = subprocess.run([sys.executable, "-m", "moefast", "train", "--resume", str(tmp_path / "dead"),
                            "--nproc", "2", "--quiet"], env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("run directory:") == 1  # one table, printed by rank 0
    metrics = json.loads((tmp_path / "dead" / "metrics.json").read_text())
    assert metrics["distributed"]["world_size"] == 2 and metrics["distributed"]["bytes_per_step"]["dense"] > 0

    # SIGTERM reaching rank 1 alone, after its first step: both ranks stop at the same step
    # boundary (agreed in the next step's all-reduce), rank 0 saves there, the command exits 143;
    # the resumed run ends bitwise as the run resumed after the SIGKILL above.
    termed = subprocess.run(
        [sys.executable, "-m", "moefast", "train", "--nproc", "2", *flags, "--out", str(tmp_path / "term")],
        env={**env, "MOEFAST_TEST_FAULT": "term:step:0:1:1:rank1"}, capture_output=True, text=True, timeout=180,
    )
    assert termed.returncode == 143, termed.stderr[-3000:]
    assert "a rank was sent SIGTERM" in termed.stderr and "--resume" in termed.stderr, termed.stderr[-3000:]
    assert "Traceback" not in termed.stderr, termed.stderr[-3000:]
    snapshot = torch.load(tmp_path / "term" / "resume.pt", weights_only=True)
    assert snapshot["stage"] is not None and snapshot["stage"]["batches"] == 2, snapshot["stage"]
    again = subprocess.run([sys.executable, "-m", "moefast", "train", "--resume", str(tmp_path / "term"),
                            "--nproc", "2", "--quiet"], env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "dead" / "checkpoints").iterdir())
    assert checkpoints == sorted(p.name for p in (tmp_path / "term" / "checkpoints").iterdir())
    for name in ["predictions.csv", *(f"checkpoints/{c}" for c in checkpoints)]:
        assert (tmp_path / "term" / name).read_bytes() == (tmp_path / "dead" / name).read_bytes(), name

    assert cli.main(["train", *flags, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert "distributed" not in one
    assert abs(metrics["test"]["wauc"] - one["test"]["wauc"]) <= WAUC_ATOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_ranks_match_one_process(tmp_path: Path) -> None:
    """The same on NCCL: 2 ranks with 2 GPUs; with one GPU, the NCCL path at world size 1."""
    world = min(2, torch.cuda.device_count())
    ranks = _run_ranks(tmp_path, world, "cuda")
    _check_parity(ranks, worker.train_all("cuda"))


def test_shard_bounds_cover_the_batch_in_rank_order() -> None:
    for total in (0, 1, 2, 3, 7, 256, 257):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(total, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1  # uneven by at most one; 0 where total < world
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        shard_bounds(4, 2, 2)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_slices_draw_the_global_batch_dropout_mask(backend: str) -> None:
    layer = AdapterLinear(5, 7, num_experts=1, rank=1, dropout=0.5, backend=backend).train()
    x = torch.randn(9, 5)
    torch.manual_seed(3)
    whole = layer.dropout_mask_for(x)
    assert whole is not None
    parts = []
    for rank in range(4):  # 9 rows on 4 ranks: 3, 2, 2, 2
        start, stop = shard_bounds(9, rank, 4)
        torch.manual_seed(3)
        with global_batch_rows(9, start, stop):
            parts.append(layer.dropout_mask_for(x[start:stop]))
    assert torch.equal(torch.cat(parts), whole)
    with global_batch_rows(9, 0, 3), pytest.raises(ValueError, match="input of 2 rows"):
        layer.dropout_mask_for(x[:2])


def test_threads_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOEFAST_THREADS_PER_RANK", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert threads_per_rank(2) == 8 and threads_per_rank(32) == 1
    monkeypatch.setenv("MOEFAST_THREADS_PER_RANK", "3")
    assert threads_per_rank(2) == 3
    monkeypatch.setenv("MOEFAST_THREADS_PER_RANK", "0")
    with pytest.raises(ValueError, match="MOEFAST_THREADS_PER_RANK must be a positive whole number, got '0'"):
        threads_per_rank(2)


def test_collective_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFAST_COLLECTIVE_TIMEOUT", "12.5")
    assert collective_timeout().total_seconds() == 12.5
    for bad in ("0", "nan", "soon"):
        monkeypatch.setenv("MOEFAST_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ValueError, match=f"MOEFAST_COLLECTIVE_TIMEOUT must be .* got '{bad}'"):
            collective_timeout()


def test_slice_batch_keeps_contiguous_rows() -> None:
    batch = Batch({"a": torch.arange(12).view(6, 2), "b": torch.arange(6)}, torch.arange(6), torch.ones(6))
    part = slice_batch(batch, 2, 5)
    assert part.features["a"].is_contiguous() and part.features["a"].tolist() == [[4, 5], [6, 7], [8, 9]]
    assert len(slice_batch(batch, 6, 6)) == 0


def test_torchrun_without_out_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Under torchrun every rank and every restart must name the same run directory: without
    --out each would pick its own timestamped one (found by review), so it is refused."""
    from moefast import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "--rows", "500", "--quiet"]) == 2
    assert "under torchrun, give --out DIR" in capsys.readouterr().err


def test_a_script_that_forgets_to_leave_has_its_group_destroyed_at_exit(tmp_path: Path) -> None:
    """A gloo group left to the interpreter's teardown can abort a finished rank ("terminate
    called without an active exception": CI once lost a torchrun test to it), so init_from_env
    registers an exit handler that destroys the group. The probe's exit handler is registered
    before the library's, so it runs after it (atexit runs last-in first-out) and sees the result."""
    script = tmp_path / "forgets.py"
    script.write_text(
        "import atexit, torch.distributed as dist\n"
        "from moefast.train import distributed\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized(), flush=True))\n"
        "assert distributed.init_from_env('cpu') is not None and dist.is_initialized()\n"
    )
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "initialized at exit: False" in done.stdout
