"""Every adapter kernel compiles for a Hopper GPU (sm_90) in bf16, without a GPU.

The interpreter runs kernels as numpy and accepts programs the GPU compiler rejects (a
``tl.dot`` under 16 wide, layouts the tensor-core lowering cannot take, mismatched types
across branches). This test records the launches the host launchers make (the routings chosen
below) and compiles each distinct kernel configuration through Triton's full NVIDIA pipeline
(TTIR, TTGIR, LLVM, PTX, ptxas to a cubin) for ``GPUTarget("cuda", 90, 32)``.

It runs in a subprocess because conftest.py sets ``TRITON_INTERPRET=1`` for this process, and
the compiler needs the kernels as real ``JITFunction``s. Run this file directly to see the table
of configurations and whether their products use tensor cores; ``--all`` adds fp32.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.interpret


def _record_and_compile(verbose: bool, everything: bool) -> int:
    """Drive the launchers with recording stubs, compile each configuration; return the count."""
    import torch
    import triton
    from moefast.kernels import adapter_linear as kernels
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    records: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    class Recorder:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> None:
                records.append((self.fn, args, kwargs))
            return launch

    for name in dir(kernels):
        obj = getattr(kernels, name)
        if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
            setattr(kernels, name, Recorder(obj))

    # GATE with ReLU and dropout (gate loads, the c-product, dg) and DOMAIN without (one-hot
    # gates in registers, block skipping, the c gather) cover every branch that differs in
    # compiled code; EXPERT and NONE only drop code from these. In the test, bf16 only: its
    # tensor-core products are where the GPU's layout and 16-wide constraints bite (fp32 IEEE
    # products lower to FMAs). Each compilation costs about a second of CPU; 14 of them keep
    # the test near 15 s with a cold cache. ``--all`` adds fp32 (21 configurations).
    n, k, o, e, r = 100, 40, 70, 10, 4
    configs = [(torch.bfloat16, "gate", True), (torch.bfloat16, "domain", False)]
    if everything:
        configs += [(torch.float32, "gate", True), (torch.float32, "domain", False)]
    for dtype, routing, relu in configs:
        x = torch.randn(n, k, dtype=dtype)
        w, b = torch.randn(o, k, dtype=dtype), torch.randn(o, dtype=dtype)
        a, bm = torch.randn(e, k, r, dtype=dtype), torch.randn(e, r, o, dtype=dtype)
        c = torch.randn(e, o, dtype=dtype)
        gate = torch.rand(n, e, dtype=dtype) if routing == "gate" else None
        domain = torch.randint(0, e, (n,)) if routing == "domain" else None
        mask = torch.ones(n, o, dtype=dtype) if relu else None
        y, u = kernels.adapter_linear_fwd(x, w, b, a, bm, c, gate, domain, None, mask, relu)
        kernels.adapter_linear_bwd(torch.randn(n, o, dtype=dtype), x, y, u, w, a, bm, c, gate,
                                   domain, None, mask, relu, (True,) * 7)

    type_names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "i64"}
    seen: dict[str, Any] = {}
    for fn, args, kwargs in records:
        values = dict(zip(fn.arg_names, args, strict=False))
        values.update({key: v for key, v in kwargs.items() if key in fn.arg_names})
        signature: dict[str, str] = {}
        constexprs: dict[tuple[int, ...], Any] = {}
        for i, param in enumerate(fn.params):
            v = values[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[(i,)] = v
            elif isinstance(v, torch.Tensor):
                signature[param.name] = "*" + type_names[v.dtype]
            else:
                assert isinstance(v, int) and not isinstance(v, bool), (param.name, v)
                signature[param.name] = "i32"
        key = f"{fn.__name__} {signature} {sorted(constexprs.items())}"
        seen.setdefault(key, (fn, signature, constexprs, kwargs.get("num_warps", 4)))

    target = GPUTarget("cuda", 90, 32)
    for fn, signature, constexprs, num_warps in seen.values():
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target,
                                  options={"num_warps": num_warps})
        assert compiled.asm["cubin"], fn.__name__
        if verbose:
            ptx = compiled.asm["ptx"]
            mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
            dtype = "bf16" if "*bf16" in signature.values() else "fp32"
            print(f"{fn.__name__:28s} {dtype} {mma:8s} shared={compiled.metadata.shared}")
    return len(seen)


def test_every_kernel_configuration_compiles_for_sm90() -> None:
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(pathlib.Path(__file__))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "compiled" in out.stdout, out.stdout


if __name__ == "__main__":
    count = _record_and_compile(verbose="-v" in sys.argv, everything="--all" in sys.argv)
    print(f"compiled {count} kernel configurations for sm_90")
