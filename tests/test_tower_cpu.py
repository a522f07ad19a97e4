"""The fused CPU tower (moefast/ops/_tower_cpu.py) against the per-layer path it replaces.

``Tower`` runs as one autograd node on CPU under ``fast``; the per-layer path (one
``CpuAdapterLinearFunction`` per hidden layer, then ``nn.Linear``) is what it must equal: the
same dropout bits, the same logits bit for bit, the same gradients for every pattern of what
trains (the stages freeze different parts), and the same errors for bad input. The node itself
is C++ (``torch.ops.moefast.tower``); its Python specification ``CpuTowerFunction`` must give the
same results bit for bit, through the same ATen calls.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from moefast import _ext
from moefast.config import TowerConfig, TowerKind
from moefast.nn.tower import Routing, Tower
from moefast.ops._tower_cpu import tower_cpu
from moefast.testing import tolerance

N, D_IN, D = 29, 7, 3
ROUTINGS: list[tuple[TowerKind, Routing, int | None]] = [
    (TowerKind.BASE, Routing.SHARED, None),
    (TowerKind.MLORA, Routing.SHARED, None),
    (TowerKind.MLORA, Routing.DOMAIN, None),
    (TowerKind.MOE_MLORA, Routing.EXPERT, 4),
    (TowerKind.MOE_MLORA, Routing.MIXTURE, None),
]
# What trains: (tower input, shared weights + output layer, adapters, gate).
NEEDS = list(itertools.product([False, True], repeat=4))


def _tower(kind: TowerKind, routing: Routing, expert: int | None, dtype: torch.dtype,
           backend: str = "fast") -> Tower:
    torch.manual_seed(0)
    config = TowerConfig(kind=kind, hidden_units=(12, 9, 5), dropout=0.3, ranks=(3, 2, 2),
                         experts_per_domain=2)
    tower = Tower(D_IN, config, D, backend=backend).to(dtype)
    with torch.no_grad():  # adapters that do something (B and c start at zero)
        for p in tower.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tower.set_routing(routing, expert)
    return tower


def _leaves(tower: Tower, needs: tuple[bool, ...]) -> None:
    """Set what trains from ``needs[1:]`` (``needs[0]``, the input, is the caller's)."""
    shared, adapters, gate = needs[1:]
    for p in tower.shared_parameters():
        p.requires_grad_(shared)
    for p in tower.adapter_parameters():
        p.requires_grad_(adapters)
    for p in tower.gate_parameters():
        p.requires_grad_(gate)


def _step(tower: Tower, x: torch.Tensor, domain: torch.Tensor, needs: tuple[bool, ...],
          seed: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor | None]]:
    """Logits, dx and every parameter gradient of one weighted-sum backward."""
    tower.zero_grad(set_to_none=True)
    _leaves(tower, needs)
    x = x.clone().requires_grad_(needs[0])
    torch.manual_seed(seed)  # the dropout draws
    logits = tower(x, domain)
    if logits.requires_grad:
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=logits.dtype)
        (logits * weights).sum().backward()
    return logits.detach(), x.grad, {name: p.grad for name, p in tower.named_parameters()}


def _per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Tower, "_runs_fused", lambda self, x: False)


def _python_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-node tower in Python (what runs when moefast._tower_ops is not built)."""
    monkeypatch.setattr(_ext, "tower_op_available", lambda: False)


native = pytest.mark.skipif(not _ext.tower_op_available(), reason="moefast._tower_ops not built")
NATIVE_NODE = "torch::autograd::CppNode<moefast::TowerFunction>"


Step = tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor | None]]


def every_case(test: Any) -> Any:
    """Every routing, in train and eval mode, in fp32 and fp64."""
    for name, values, ids in [(("kind", "routing", "expert"), ROUTINGS, lambda v: getattr(v, "value", v)),
                              ("training", [True, False], ["train", "eval"]),
                              ("dtype", [torch.float32, torch.float64], None)]:
        test = pytest.mark.parametrize(name, values, ids=ids)(test)
    return test


def _both_paths(kind: TowerKind, routing: Routing, expert: int | None, training: bool, dtype: torch.dtype,
                other: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[bool, ...], Step, Step]]:
    """For every pattern of what trains: a step on the path ``fast`` runs, then on the path
    ``other(monkeypatch)`` switches to, with the same inputs and dropout draws."""
    tower = _tower(kind, routing, expert, dtype).train(training)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D_IN, generator=g, dtype=dtype)
    domain = torch.randint(0, D, (N,), generator=g)
    out = []
    for needs in NEEDS:
        assert tower._runs_fused(x)
        got = _step(tower, x, domain, needs, seed=7)
        with monkeypatch.context() as m:
            other(m)
            want = _step(tower, x, domain, needs, seed=7)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, msg=f"logits, needs={needs}")
        out.append((needs, got, want))
    return out


def _gradients(got: Step, want: Step) -> list[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    return [("dx", got[1], want[1]), *[(n, got[2][n], want[2][n]) for n in got[2]]]


@every_case
def test_fused_tower_equals_the_per_layer_path(kind: TowerKind, routing: Routing, expert: int | None,
                                               training: bool, dtype: torch.dtype,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tol = tolerance(dtype)
    for needs, fused, per_layer in _both_paths(kind, routing, expert, training, dtype, _per_layer, monkeypatch):
        for name, a, b in _gradients(fused, per_layer):
            if a is None or b is None:
                # Both absent, or one absent and the other zero (the lookup-free gate of a
                # routing that does not read it).
                other = a if b is None else b
                assert other is None or not other.any(), f"{name} only on one path, needs={needs}"
                continue
            torch.testing.assert_close(a, b, rtol=tol.rtol, atol=tol.atol, msg=f"{name}, needs={needs}")


@native
@every_case
def test_the_native_node_equals_its_python_specification(kind: TowerKind, routing: Routing, expert: int | None,
                                                         training: bool, dtype: torch.dtype,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit for bit, logits and every gradient, for every pattern of what trains."""
    for needs, got, want in _both_paths(kind, routing, expert, training, dtype, _python_node, monkeypatch):
        for name, a, b in _gradients(got, want):
            assert (a is None) == (b is None), f"{name} only on one path, needs={needs}"
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}, needs={needs}")


# The arithmetic and allocating ATen ops the tower calls (views and metadata ops are left out:
# Python and C++ reach the same view through different ones, `.T` against `t()`).
COMPUTE_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::add", "aten::add_", "aten::mul",
               "aten::mul_", "aten::cat", "aten::relu_", "aten::threshold_backward", "aten::sum",
               "aten::zeros", "aten::zeros_like", "aten::copy_", "aten::one_hot"}


def _aten_calls(tower: Tower, x: torch.Tensor, domain: torch.Tensor) -> tuple[list[str], list[str]]:
    """The compute ops of one forward and of one backward, in order (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    def names(prof: Any) -> list[str]:
        return [e.name for e in prof.events() if e.name in COMPUTE_OPS]

    tower(x, domain).sum().backward()  # first-call work (cached constants) stays out
    tower.zero_grad(set_to_none=True)  # no accumulation into earlier gradients either
    with profile(activities=[ProfilerActivity.CPU]) as forward:
        logits = tower(x, domain)
    with profile(activities=[ProfilerActivity.CPU]) as backward:
        logits.sum().backward()
    return names(forward), names(backward)


@native
@pytest.mark.parametrize(("routing", "expert", "needs"), [
    (Routing.EXPERT, 4, (False, False, True, False)),  # an expert stage: only the adapters train
    (Routing.MIXTURE, None, (False, False, False, True)),  # the gate stage
    (Routing.MIXTURE, None, (True, True, True, True)),  # everything
], ids=["expert-stage", "gate-stage", "all"])
def test_the_native_node_runs_and_makes_the_same_aten_calls(routing: Routing, expert: int | None,
                                                             needs: tuple[bool, ...],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    tower = _tower(TowerKind.MOE_MLORA, routing, expert, torch.float32)
    x = torch.randn(N, D_IN, requires_grad=needs[0])
    domain = torch.zeros(N, dtype=torch.int64)
    _leaves(tower, needs)
    assert tower(x, domain).grad_fn.name() == NATIVE_NODE
    got = _aten_calls(tower, x, domain)
    with monkeypatch.context() as m:
        _python_node(m)
        assert type(tower(x, domain).grad_fn).__name__ == "CpuTowerFunctionBackward"
        want = _aten_calls(tower, x, domain)
    assert got == want
    assert got[0].count("aten::mm") == 3 and "aten::mm" in got[1]


def test_the_python_node_computes_only_what_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    _python_node(monkeypatch)
    tower = _tower(TowerKind.MOE_MLORA, Routing.EXPERT, 4, torch.float32)
    x = torch.randn(N, D_IN)
    domain = torch.zeros(N, dtype=torch.int64)
    _leaves(tower, (False, False, True, False))  # an expert stage: only the adapters train
    logits = tower(x, domain)
    assert type(logits.grad_fn).__name__ == "CpuTowerFunctionBackward"
    calls: list[bool] = []
    import moefast.ops._tower_cpu as fused

    real = fused.layer_backward

    def spy(saved: Any, dy: torch.Tensor, *args: Any) -> Any:
        calls.append(args[4][0])  # need_x of this layer
        return real(saved, dy, *args)

    monkeypatch.setattr(fused, "layer_backward", spy)
    logits.sum().backward()
    # Top-down: the two upper layers pass a gradient down to the adapters below; the first
    # layer has nothing below it that trains, so it computes no dx. (The native node makes the
    # same ATen calls: test_the_native_node_runs_and_makes_the_same_aten_calls.)
    assert calls == [True, True, False]
    layer = tower.hidden_layers()[1]
    assert layer.lora_A.grad is not None and layer.lora_A.grad[4].abs().sum() > 0
    assert not torch.cat([layer.lora_A.grad[:4], layer.lora_A.grad[5:]]).any()


@native
def test_the_native_node_refuses_double_backward_and_bad_calls() -> None:
    tower = _tower(TowerKind.MOE_MLORA, Routing.MIXTURE, None, torch.float32)
    x = torch.randn(N, D_IN, requires_grad=True)
    logits = tower(x, torch.zeros(N, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(logits.sum(), x, create_graph=True)
    op = _ext.tower_op()
    params = [p for layer in tower.hidden_layers()
              for p in (layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_c)]
    full = [*params, tower.output.weight, tower.output.bias]
    with pytest.raises(ValueError, match="16 parameters for 3 layers"):
        op(x, None, None, full[:-1], None, [None] * 3)
    with pytest.raises(ValueError, match="expert 9 outside"):
        op(x, None, None, full, 9, [None] * 3)
    with pytest.raises(ValueError, match="expert -1 is negative"):
        op(x, None, None, full, -1, [None] * 3)
    with pytest.raises(ValueError, match="layer input width 6"):
        op(torch.randn(N, 6), None, None, full, None, [None] * 3)
    with pytest.raises(ValueError, match="dropout mask"):
        op(x, None, None, full, None, [torch.ones(N, 11), None, None])
    with pytest.raises(ValueError, match="at most one of"):
        op(x, None, torch.zeros(N, dtype=torch.int64), full, 1, [None] * 3)
    with pytest.raises(ValueError, match="Linear"):
        op(x, None, None, [*params, tower.output.weight[:, :4], tower.output.bias], None, [None] * 3)


def test_hooks_and_the_reference_backend_keep_the_per_layer_modules() -> None:
    x = torch.randn(N, D_IN)
    domain = torch.zeros(N, dtype=torch.int64)
    tower = _tower(TowerKind.MOE_MLORA, Routing.MIXTURE, None, torch.float32)
    assert tower._runs_fused(x)
    seen: list[tuple[int, ...]] = []
    handle = tower.layers[1].register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    assert not tower._runs_fused(x)
    tower(x, domain)
    assert seen == [(N, 9)]
    handle.remove()
    assert tower._runs_fused(x)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    assert not tower._runs_fused(x)  # a hook for every module: each layer must be called
    handle.remove()
    assert tower._runs_fused(x)
    tower.layers[0].backend = "reference"  # one layer asks for the reference: no fusion
    assert not tower._runs_fused(x)
    assert not _tower(TowerKind.MOE_MLORA, Routing.MIXTURE, None, torch.float32, "reference")._runs_fused(x)


def test_bad_input_is_named() -> None:
    tower = _tower(TowerKind.MLORA, Routing.DOMAIN, None, torch.float32)
    x = torch.randn(N, D_IN)
    with pytest.raises(ValueError, match="domain id 3 is outside"):
        tower(x, torch.full((N,), 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"weight must be \[out, 6\]"):
        tower(torch.randn(N, 6), torch.zeros(N, dtype=torch.int64))
    layers = [(layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_c) for layer in tower.hidden_layers()]
    out = tower.output
    with pytest.raises(ValueError, match="2 dropout masks for 3 layers"):
        tower_cpu(x, layers, out.weight, out.bias, masks=[None, None])
    with pytest.raises(ValueError, match=r"Linear\(5, 1\)"):
        tower_cpu(x, layers, out.weight[:, :4], out.bias)
    with pytest.raises(TypeError, match="output weight"):
        tower_cpu(x, layers, out.weight.double(), out.bias)
    with pytest.raises(ValueError, match="at least one hidden layer"):
        tower_cpu(x, [], out.weight, out.bias)
