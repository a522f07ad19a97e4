"""The CPU tower layer of the fast path (moefast/ops/_adapter_cpu.py) against the loop-form
reference: the output and every gradient, for each routing, with and without dropout and ReLU,
and for every combination of inputs that train (it computes only the gradients asked for)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from moefast.ops import adapter_linear
from moefast.ops._adapter_cpu import CpuAdapterLinearFunction, adapter_linear_cpu
from moefast.reference.adapter import Activation
from moefast.reference.adapter import adapter_linear as reference
from moefast.testing import tolerance

N, D_IN, D_OUT, E, R = 37, 11, 13, 4, 3
ROUTINGS = ["shared", "expert", "gate", "domain"]
# (x, W and b, adapters and gate) train or not.
NEEDS = list(itertools.product([False, True], repeat=3))


def _inputs(routing: str, dtype: torch.dtype, mask: bool, seed: int = 0) -> tuple[list[torch.Tensor], dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(N, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g),
               torch.randn(D_OUT, generator=g), torch.randn(E, D_IN, R, generator=g),
               torch.randn(E, R, D_OUT, generator=g), torch.randn(E, D_OUT, generator=g)]
    kw: dict[str, Any] = {
        "gate": torch.softmax(torch.randn(N, E, generator=g), 1) if routing == "gate" else None,
        "domain": torch.randint(0, E, (N,), generator=g) if routing == "domain" else None,
        "expert": 2 if routing == "expert" else None,
        "dropout_mask": (torch.rand(N, D_OUT, generator=g) < 0.7) / 0.7 if mask else None,
    }
    return [t.to(dtype) for t in tensors], {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                            for k, v in kw.items()}


def _run(fn: Any, tensors: list[torch.Tensor], kw: dict[str, Any], needs: tuple[bool, ...],
         activation: Activation) -> list[torch.Tensor | None]:
    flags = [needs[0], needs[1], needs[1], needs[2], needs[2], needs[2]]
    leaves = [t.clone().requires_grad_(f) for t, f in zip(tensors, flags, strict=True)]
    gate = kw["gate"].clone().requires_grad_(needs[2]) if kw["gate"] is not None else None
    y = fn(*leaves, **{**kw, "gate": gate}, activation=activation)
    if y.requires_grad:
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        (y * weights).sum().backward()
    return [y.detach(), *(t.grad for t in leaves), gate.grad if gate is not None else None]


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("activation", list(Activation))
@pytest.mark.parametrize("mask", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_output_and_gradients_match_the_reference(routing: str, activation: Activation, mask: bool,
                                                   dtype: torch.dtype) -> None:
    tol = tolerance(dtype)
    for needs in NEEDS:
        tensors, kw = _inputs(routing, dtype, mask)
        got = _run(adapter_linear_cpu, tensors, kw, needs, activation)
        want = _run(reference, tensors, kw, needs, activation)
        names = ["y", "dx", "dW", "db", "dA", "dB", "dc", "dgate"]
        for name, a, b in zip(names, got, want, strict=True):
            if b is None and a is not None:
                b = torch.zeros_like(a)  # the reference gives no gradient where it is zero
            if a is None and b is not None:
                assert not b.any(), f"{name} missing with needs={needs}"
                continue
            if a is not None:
                torch.testing.assert_close(a, b, rtol=tol.rtol, atol=tol.atol, msg=f"{name}, needs={needs}")


def test_expert_gradients_touch_only_that_expert() -> None:
    tensors, kw = _inputs("expert", torch.float32, mask=True)
    _, _, _, _, d_a, d_b, d_c, _ = _run(adapter_linear_cpu, tensors, kw, (False, False, True), Activation.RELU)
    for grad in (d_a, d_b, d_c):
        assert grad is not None and grad[2].abs().sum() > 0
        assert not torch.cat([grad[:2], grad[3:]]).any()


def test_frozen_inputs_get_no_gradient_and_w_is_not_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    """An expert stage: only the adapters train, so no product with W's gradient shape runs."""
    shapes: list[tuple[int, ...]] = []
    real_mm = torch.Tensor.__matmul__

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real_mm(a, b)
        shapes.append(tuple(out.shape))
        return out

    tensors, kw = _inputs("expert", torch.float32, mask=True)
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    grads = _run(adapter_linear_cpu, tensors, kw, (False, False, True), Activation.RELU)
    assert grads[1] is None and grads[2] is None and grads[3] is None
    assert (D_OUT, D_IN) not in shapes and (D_OUT + R, D_IN) not in shapes


def test_the_fast_backend_runs_it_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real = CpuAdapterLinearFunction.apply

    def apply(*args: Any) -> torch.Tensor:
        seen.append(True)
        return real(*args)

    monkeypatch.setattr(CpuAdapterLinearFunction, "apply", apply)
    monkeypatch.delenv("MOEFAST_TRITON_CPU", raising=False)
    tensors, kw = _inputs("gate", torch.float32, mask=False)
    adapter_linear(*tensors, **kw, backend="fast")
    assert seen == [True]


def test_bad_input_is_refused_before_any_work() -> None:
    tensors, kw = _inputs("expert", torch.float32, mask=False)
    with pytest.raises(ValueError, match=r"expert 9 is outside \[0, 4\)"):
        adapter_linear_cpu(*tensors, **{**kw, "expert": 9})
    with pytest.raises(ValueError, match=r"domain id 4 is outside \[0, 4\)"):
        adapter_linear_cpu(*tensors, **{**kw, "expert": None, "domain": torch.full((N,), 4)})
