"""The fused embedding step with half tables, timed alone, for ``perf record`` (issue 28).

Runs ``bench/test_bench_embedding.py``'s workload (26 fields, batch 4096, Zipf ids; ``d64``:
1,000,000-row tables at dim 64, ``d16``: 10^7 rows at dim 16) through the engine's fused step
(lookup, backward, optimizer) with its tables in ``--precision``, warms up, then times
``--steps`` steps and prints the milliseconds per step. The workload's setup (random tables and
ids) takes most of a short run's samples: read a profile by the engine's symbols
(``sum_and_update_*``, ``pool_bags_*``, ``radix_sort_by_id``).

The shipped extension is stripped; for symbols, link the same objects again unstripped and put
that file in place of the installed one while recording and reporting (docs/performance.md,
"Half tables"):

    perf record -g -o perf-bf16.data .venv/bin/python tools/profile_half_update.py --precision bf16
    perf report -i perf-bf16.data --no-children --sort dso,symbol -g none -n

Do not run it while other jobs load the machine (the figures would be wrong).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=list(DTYPES), default="bf16")
    parser.add_argument("--optimizer", choices=["rowwise-adagrad", "lazy-adam"], default="rowwise-adagrad")
    parser.add_argument("--workload", choices=["d16", "d64"], default="d64")
    parser.add_argument("--max-rows", type=int, default=None, help="cap each table's rows (a quick check)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from test_bench_embedding import WORKLOADS, _cycle, _make_workload

    from moefast.ops.embedding import LazyAdam, RowwiseAdagrad, embedding_collection

    torch.set_num_threads(args.threads)
    dim, rows = WORKLOADS[args.workload]
    workload = _make_workload(args.workload, dim, min(rows, args.max_rows or rows))
    tables = [w.detach().to(DTYPES[args.precision]).requires_grad_() for w in workload.weights]
    config = LazyAdam(lr=0.01) if args.optimizer == "lazy-adam" else RowwiseAdagrad(lr=0.01)
    states = [config.init_state(w) for w in tables]
    next_batch = _cycle(workload)

    def step() -> None:
        b = next_batch()
        out = embedding_collection(tables, b["indices"], b["offsets"], b["poolings"], optimizer=config,
                                   optimizer_states=states, backend="fast")
        out.backward(workload.grad_out)

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step = (time.perf_counter() - start) / args.steps
    print(f"{args.workload} {args.precision} {args.optimizer}: {per_step * 1e3:.2f} ms per step "
          f"({args.steps} steps, {args.threads} threads)")


if __name__ == "__main__":
    main()
