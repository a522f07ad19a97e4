"""``moefast.ops.adapter_linear``: backend resolution, the torch.library registration, compile.

Kernel numerics are in test_adapter_kernels.py; here: which path runs, that it says why when it
cannot, and that the custom ops satisfy ``torch.library.opcheck`` and trace under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import moefast.ops.adapter as ops_adapter
from moefast.nn import AdapterLinear
from moefast.ops import adapter_linear
from moefast.ops._backend import ENV_VAR, Backend, BackendUnavailableError
from moefast.ops.adapter import TRITON_CPU_ENV, FastImpl
from moefast.testing import tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEVICE == "cpu"


def _inputs(n: int = 20, k: int = 12, o: int = 10, e: int = 3, r: int = 4,
            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "x": torch.randn(n, k, generator=g),
        "weight": torch.randn(o, k, generator=g),
        "bias": torch.randn(o, generator=g),
        "lora_A": torch.randn(e, k, r, generator=g),
        "lora_B": torch.randn(e, r, o, generator=g),
        "lora_c": torch.randn(e, o, generator=g),
    }
    return {key: v.to(DEVICE, dtype) for key, v in t.items()}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records which implementation each call ran: "triton", "cpu" (the CPU fused form) or
    "loop"."""
    seen: list[str] = []
    real_kernels = ops_adapter._kernels
    real_cpu = ops_adapter.adapter_linear_cpu
    real_loop = ops_adapter._reference.adapter_linear

    def kernels() -> Any:
        seen.append("triton")
        return real_kernels()

    def cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append("cpu")
        return real_cpu(*args, **kwargs)

    def loop(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append("loop")
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(ops_adapter, "_kernels", kernels)
    monkeypatch.setattr(ops_adapter, "adapter_linear_cpu", cpu)
    monkeypatch.setattr(ops_adapter._reference, "adapter_linear", loop)
    yield seen


@pytest.fixture
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv(TRITON_CPU_ENV, "1")


@pytest.mark.skipif(not ON_CPU, reason="CPU resolution rules")
def test_cpu_fast_is_the_cpu_form_and_triton_needs_the_opt_in(
    calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as in the tests: not enough on its own
    monkeypatch.delenv(TRITON_CPU_ENV, raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    for backend in (None, "auto", "fast", "reference"):
        adapter_linear(**_inputs(), expert=0, backend=backend)
    assert calls == ["cpu", "cpu", "cpu", "loop"]
    # bf16 and float64 have a CPU fast path too (plain torch).
    adapter_linear(**_inputs(dtype=torch.bfloat16), expert=0, backend="fast")
    adapter_linear(**_inputs(dtype=torch.float64), expert=0, backend="fast")
    assert calls[4:] == ["cpu", "cpu"]
    calls.clear()
    monkeypatch.setenv(TRITON_CPU_ENV, "1")
    adapter_linear(**_inputs(), expert=0, backend="fast")
    monkeypatch.setenv(ENV_VAR, "fast")  # the environment variable is a request too
    adapter_linear(**_inputs(), expert=0)
    assert calls == ["triton", "triton"]


@pytest.mark.skipif(not ON_CPU, reason="CPU resolution rules")
def test_triton_on_cpu_says_why_it_cannot_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRITON_CPU_ENV, "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match=r"adapter_linear.*TRITON_INTERPRET=1"):
        adapter_linear(**_inputs(), backend="fast")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match=r"torch\.bfloat16 under the Triton interp"):
        adapter_linear(**_inputs(dtype=torch.bfloat16), backend="fast")
    # auto falls back to the reference where the requested kernels cannot serve, and says so
    # only on an explicit request.
    assert ops_adapter.why_not_fast(_inputs(dtype=torch.float64)["x"]) is not None
    adapter_linear(**_inputs(dtype=torch.float64), backend="auto")


def test_why_not_fast_on_cuda_tensors() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert ops_adapter.fast_implementation(torch.zeros(1, device="cuda")) == (FastImpl.TRITON,
                                                                              None)
    assert "float64" in str(ops_adapter.why_not_fast(torch.zeros(1, device="cuda").double()))


def test_fast_path_validates_like_the_reference(triton_on_cpu: None) -> None:
    with pytest.raises(ValueError, match="at most one of gate, domain, expert"):
        adapter_linear(**_inputs(), expert=0, domain=torch.zeros(20, dtype=torch.int64,
                                                                 device=DEVICE), backend="fast")
    with pytest.raises(ValueError, match="expert 3"):
        adapter_linear(**_inputs(), expert=3, backend="fast")


def test_module_backend_attribute(calls: list[str], triton_on_cpu: None,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    torch.manual_seed(0)
    layer = AdapterLinear(12, 10, 3, 4, backend="fast").to(DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_c.normal_()
    assert layer.backend is Backend.FAST
    x = torch.randn(20, 12, device=DEVICE)
    domain = torch.tensor([0, 1, 2, 1] * 5, device=DEVICE)
    fast = layer(x, domain=domain)
    layer.backend = Backend.REFERENCE
    reference = layer(x, domain=domain)
    assert calls == ["triton", "loop"]
    tol = tolerance(torch.float32)
    torch.testing.assert_close(fast, reference, rtol=tol.rtol, atol=tol.atol)


def _op_args(routing: str, dropout: bool) -> tuple[Any, ...]:
    t = {k: v.requires_grad_() for k, v in _inputs().items()}
    gate = domain = expert = None
    if routing == "gate":
        gate = torch.softmax(torch.randn(20, 3, device=DEVICE), 1).requires_grad_()
    elif routing == "domain":
        domain = torch.randint(0, 3, (20,), device=DEVICE)
    elif routing == "expert":
        expert = 1
    mask = (torch.rand(20, 10, device=DEVICE) > 0.5).float() * 2.0 if dropout else None
    return (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["lora_c"],
            gate, domain, expert, mask, True)


@pytest.mark.interpret
@pytest.mark.parametrize(("routing", "dropout"), [("gate", True), ("domain", False),
                                                  ("expert", False), ("none", True)])
def test_opcheck_forward(routing: str, dropout: bool) -> None:
    # Schema, fake (meta) implementation, autograd registration, and AOT dispatch with
    # dynamic shapes, forward and backward.
    torch.library.opcheck(torch.ops.moefast.adapter_linear_fwd.default,
                          _op_args(routing, dropout))


@pytest.mark.interpret
def test_opcheck_backward() -> None:
    args = _op_args("gate", True)
    y, u = torch.ops.moefast.adapter_linear_fwd(*args)
    x, weight, _, lora_A, lora_B, lora_c, gate, domain, expert, mask, relu = (
        a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    dy = torch.randn_like(y)
    for needs in ([True] * 7, [False, False, False, True, True, True, False]):
        # The backward op has no backward of its own (no double backward), so AOT dispatch,
        # which differentiates through it, is left out.
        torch.library.opcheck(
            torch.ops.moefast.adapter_linear_bwd.default,
            (dy, x, y.detach(), u, weight, lora_A, lora_B, lora_c, gate, domain, expert, mask,
             relu, needs),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


@pytest.mark.interpret
def test_compile_traces_without_graph_breaks(triton_on_cpu: None) -> None:
    torch.manual_seed(0)
    layer = AdapterLinear(12, 10, 3, 4, backend="fast").to(DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_c.normal_()
    x = torch.randn(20, 12, device=DEVICE, requires_grad=True)
    gate = torch.softmax(torch.randn(20, 3, device=DEVICE), 1).requires_grad_()

    def loss(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return layer(x, gate=gate).square().sum()

    # fullgraph=True turns any graph break into an error. On CPU, aot_eager traces the
    # custom ops (forward and backward) without generating C++; on CUDA, inductor compiles.
    inner = torch._dynamo.lookup_backend("aot_eager" if ON_CPU else "inductor")
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return inner(gm, example_inputs)

    compiled = torch.compile(loss, fullgraph=True, backend=recording)
    got = compiled(x, gate)
    (graph,) = graphs
    targets = [str(node.target) for node in graph.graph.nodes]
    # Traced as the custom op (one node), not through the eager autograd.Function.
    assert targets.count("moefast.adapter_linear_fwd.default") == 1, targets
    got_grads = torch.autograd.grad(got, [x, gate, layer.weight, layer.lora_A])
    want = loss(x, gate)
    want_grads = torch.autograd.grad(want, [x, gate, layer.weight, layer.lora_A])
    tol = tolerance(torch.float32)
    torch.testing.assert_close(got, want, rtol=tol.rtol, atol=tol.atol)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tol.rtol, atol=tol.atol)
