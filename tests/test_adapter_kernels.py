"""The fused Triton adapter layer against a float64 reference: output and every gradient.

On CPU these run through the Triton interpreter on small fp32 shapes: conftest.py sets
``TRITON_INTERPRET=1`` and the fixture below ``MOEFAST_TRITON_CPU=1``, without which ``fast`` on
CPU runs the CPU tower layer (moefast/ops/_adapter_cpu.py). On a CUDA machine the same tests
run compiled. bf16 and larger compiled shapes are ``gpu`` tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moefast.ops import adapter_linear
from moefast.ops.adapter import TRITON_CPU_ENV
from moefast.reference.adapter import Activation
from moefast.reference.adapter import adapter_linear as reference_adapter_linear
from moefast.testing import assert_close_relative_to_reference, tolerance

pytestmark = pytest.mark.interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["x", "weight", "bias", "lora_A", "lora_B", "lora_c", "gate"]


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route ``backend="fast"`` on CPU tensors to the interpreted Triton kernels."""
    if DEVICE == "cpu":
        monkeypatch.setenv(TRITON_CPU_ENV, "1")


@dataclasses.dataclass(frozen=True)
class Shape:
    n: int
    d_in: int
    d_out: int
    experts: int
    rank: int


def make_inputs(shape: Shape, routing: str, *, seed: int = 0, dropout: float = 0.0,
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Parameters scaled so every term is O(1), and the routing's argument."""
    g = torch.Generator().manual_seed(seed)
    n, k, o, e, r = shape.n, shape.d_in, shape.d_out, shape.experts, shape.rank
    t: dict[str, Any] = {
        "x": torch.randn(n, k, generator=g),
        "weight": torch.randn(o, k, generator=g) / k**0.5,
        "bias": torch.randn(o, generator=g) * 0.5,
        "lora_A": torch.randn(e, k, r, generator=g) / k**0.5,
        "lora_B": torch.randn(e, r, o, generator=g) / r**0.5,
        "lora_c": torch.randn(e, o, generator=g) * 0.5,
    }
    if routing == "gate":
        t["gate"] = torch.softmax(2.0 * torch.randn(n, e, generator=g), dim=1)
    elif routing == "domain":
        t["domain"] = torch.randint(0, e, (n,), generator=g)
    elif routing == "expert":
        t["expert"] = e - 1
    if dropout > 0.0:
        keep = torch.rand(n, o, generator=g) >= dropout
        t["dropout_mask"] = keep.to(torch.float32) / (1.0 - dropout)
    out: dict[str, Any] = {}
    for key, v in t.items():
        if isinstance(v, torch.Tensor):
            v = v.to(DEVICE)
            if v.is_floating_point():
                v = v.to(dtype)
        out[key] = v
    return out


def run(fn: Callable[..., torch.Tensor], inputs: dict[str, Any], dy: torch.Tensor,
        trainable: set[str], **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """y and the gradients of ``(y * dy).sum()`` for the inputs named in ``trainable``."""
    args = {k: (v.detach().clone().requires_grad_(k in trainable)
                if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}
    y = fn(**args, **kw)
    wrt = [args[k] for k in NAMES if k in args and k in trainable]
    grads = torch.autograd.grad(y, wrt, dy, allow_unused=True) if wrt and y.numel() else []
    named = dict(zip([k for k in NAMES if k in args and k in trainable], grads, strict=True))
    return y, named


def _float64(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


def check_parity(shape: Shape, routing: str, *, activation: Activation = Activation.RELU,
                 dropout: float = 0.0, trainable: set[str] | None = None, seed: int = 0,
                 inputs: dict[str, Any] | None = None) -> None:
    """Fast fp32 output and gradients against the reference evaluated in float64.

    The output must match elementwise within the fp32 table. A gradient is a reduction over
    hundreds of products with cancellation, where torch's own fp32 result misses the table on
    its smallest elements; there the kernel's error must stay within a small multiple of the
    fp32 reference's own error (moefast.testing, as for bf16).
    """
    if inputs is None:
        inputs = make_inputs(shape, routing, seed=seed, dropout=dropout)
    if trainable is None:
        trainable = set(NAMES)
    dy = torch.randn(shape.n, shape.d_out, generator=torch.Generator().manual_seed(seed + 1))
    dy = dy.to(DEVICE)
    y, grads = run(adapter_linear, inputs, dy, trainable, activation=activation, backend="fast")
    _, grads_fp32 = run(reference_adapter_linear, inputs, dy, trainable, activation=activation)
    y_ref, grads_ref = run(reference_adapter_linear, _float64(inputs), dy.double(), trainable,
                           activation=activation)
    tol = tolerance(torch.float32)
    assert y.dtype == torch.float32 and y.shape == (shape.n, shape.d_out)
    torch.testing.assert_close(y.double(), y_ref, rtol=tol.rtol, atol=tol.atol)
    assert grads.keys() == grads_ref.keys()
    for name, got in grads.items():
        want = grads_ref[name]
        if want is None:
            # Unused by this routing (the adapter of a base-only call): the fused op still
            # returns a gradient, and it must be zero.
            assert got is not None and not got.any(), name
            continue
        fp32 = grads_fp32[name]
        assert got is not None and fp32 is not None, name
        assert got.dtype == inputs[name].dtype and got.shape == want.shape, name
        assert_close_relative_to_reference(got, fp32, want, name=f"d{name}")


ROUTINGS = ["gate", "domain", "expert", "none"]

# Each shape with the reason it is here. Blocks are 64 wide (BLOCK_M = BLOCK_N = BLOCK_K), the
# rank is padded to a power of two RP and experts are blocked so EB * RP >= 16.
SHAPES = {
    "ordinary: two row tiles, ragged out": Shape(100, 40, 70, 4, 8),
    "in and out span several 64-wide tiles with ragged edges": Shape(70, 130, 150, 3, 4),
    "rank 1: sixteen experts per 16-wide column block, mostly padding": Shape(70, 20, 30, 3, 1),
    "rank 64: one expert per column block": Shape(40, 30, 20, 2, 64),
    "rank 5 is not a power of two: padded to 8": Shape(50, 24, 33, 5, 5),
    "E = 32 (the maximum): two 16-wide gate blocks in the c-product": Shape(40, 16, 24, 32, 2),
    "E = 17: the last expert block is partial": Shape(40, 16, 24, 17, 4),
    "E = 1": Shape(30, 12, 10, 1, 3),
    "a single row": Shape(1, 24, 20, 3, 4),
    "N = 65, one past a multiple of the block": Shape(65, 10, 12, 3, 2),
    "seeds' first tower layer, scaled down (input 24, E 7, rank 16)": Shape(96, 24, 64, 7, 16),
}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_output_and_gradients_match_float64(shape: Shape, routing: str) -> None:
    check_parity(shape, routing)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_dropout_mask_and_linear_activation(routing: str) -> None:
    # The mask scales the shared path only; without ReLU every row's gradient flows.
    check_parity(Shape(80, 20, 36, 3, 4), routing, dropout=0.5, activation=Activation.NONE)
    check_parity(Shape(80, 20, 36, 3, 4), routing, dropout=0.5, seed=3)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_empty_batch(routing: str) -> None:
    shape = Shape(0, 12, 10, 3, 2)
    inputs = make_inputs(shape, routing)
    dy = torch.zeros(0, 10, device=DEVICE)
    y, _ = run(adapter_linear, inputs, dy, set(), backend="fast")
    assert y.shape == (0, 10)
    args = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v) for k, v in inputs.items()}
    y = adapter_linear(**args, backend="fast")
    y.sum().backward()
    for name in NAMES:
        if name in args:
            grad = args[name].grad
            assert grad is not None and grad.shape == args[name].shape and not grad.any(), name


def test_domain_with_no_rows_and_all_rows_in_one_domain() -> None:
    shape = Shape(90, 20, 30, 6, 4)
    inputs = make_inputs(shape, "domain")
    # Domains 1 and 4 have no rows: their adapters get zero gradients.
    inputs["domain"] = torch.tensor([0, 2, 3, 5] * 22 + [0, 0], device=DEVICE)
    check_parity(shape, "domain", inputs=inputs)
    # Single-domain batches (the seeds' training loop): every other expert block is skipped.
    inputs["domain"] = torch.full((90,), 3, device=DEVICE)
    check_parity(shape, "domain", inputs=inputs)


def test_one_hot_gate_equals_domain_routing() -> None:
    # A gate with exact zeros: rows must not pick up the adapters they do not route to.
    shape = Shape(70, 20, 30, 5, 4)
    by_domain = make_inputs(shape, "domain")
    by_gate = dict(by_domain)
    by_gate["gate"] = torch.nn.functional.one_hot(by_gate.pop("domain"), 5).float()
    y_domain = adapter_linear(**by_domain, backend="fast")
    y_gate = adapter_linear(**by_gate, backend="fast")
    tol = tolerance(torch.float32)
    torch.testing.assert_close(y_gate, y_domain, rtol=tol.rtol, atol=tol.atol)
    check_parity(shape, "gate", inputs=by_gate)


def test_non_contiguous_inputs() -> None:
    # Kernels read through strides: transposed and sliced views need no copy.
    shape = Shape(70, 24, 36, 3, 4)
    inputs = make_inputs(shape, "gate", dropout=0.3)
    inputs["x"] = inputs["x"].T.contiguous().T
    inputs["weight"] = inputs["weight"].T.contiguous().T
    inputs["gate"] = torch.cat([inputs["gate"], inputs["gate"]], dim=1)[:, ::2]
    inputs["lora_A"] = inputs["lora_A"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not inputs["x"].is_contiguous() and not inputs["gate"].is_contiguous()
    check_parity(shape, "gate", inputs=inputs)


@pytest.mark.parametrize("n", [150, 100], ids=["one tile per split", "an empty split"])
def test_weight_gradients_reduced_over_row_splits(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU, small weights reduce over several row splits (fp32 partials, summed by torch);
    # on CPU the launcher picks one split, so force three here to check that path.
    from moefast.kernels import adapter_linear as kernels

    monkeypatch.setattr(kernels, "_num_splits", lambda rows, tiles, device: 3)
    check_parity(Shape(n, 20, 30, 3, 4), "gate", dropout=0.5)
    check_parity(Shape(n, 20, 30, 3, 4), "expert")


# The autouse fixture only sets an environment variable: safe to share between examples.
@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 80),  # n = 0 is test_empty_batch
    d_in=st.integers(1, 48), d_out=st.integers(1, 48),
    experts=st.integers(1, 9), rank=st.integers(1, 12),
    routing=st.sampled_from(ROUTINGS), dropout=st.booleans(),
)
def test_random_shapes(n: int, d_in: int, d_out: int, experts: int, rank: int, routing: str,
                       dropout: bool) -> None:
    # derandomize: the same few examples every run (the interpreter is slow; CI time is fixed).
    check_parity(Shape(n, d_in, d_out, experts, rank), routing, dropout=0.5 if dropout else 0.0)


# The stages of MoE-MLoRA and what trains in each (DESIGN.md section 2); x never needs a
# gradient in stages 2-3 when the embeddings are frozen.
STAGES = {
    "backbone": ("none", {"x", "weight", "bias"}),
    "expert": ("expert", {"lora_A", "lora_B", "lora_c"}),
    "gate": ("gate", {"gate"}),
    "gate, tower input trains": ("gate", {"gate", "x"}),
    "mlora joint": ("domain", {"x", "weight", "bias", "lora_A", "lora_B", "lora_c"}),
}
# Which backward kernels each stage needs: frozen inputs cost no launch.
EXPECTED_LAUNCHES = {
    "backbone": {"input", "weight"},
    "expert": {"rank", "a", "b"},
    "gate": {"rank"},
    "gate, tower input trains": {"rank", "input"},
    "mlora joint": {"rank", "input", "weight", "a", "b"},
}
BACKWARD_KERNELS = {"rank": "_adapter_bwd_rank_kernel", "input": "_adapter_bwd_input_kernel",
                    "weight": "_adapter_bwd_weight_kernel", "a": "_adapter_bwd_a_kernel",
                    "b": "_adapter_bwd_b_kernel"}


class _LaunchSpy:
    """Wraps a Triton kernel and records that it was launched."""

    def __init__(self, kernel: Any, name: str, launched: set[str]) -> None:
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid: Any) -> Any:
        self.launched.add(self.name)
        return self.kernel[grid]


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    from moefast.kernels import adapter_linear as kernels

    names: set[str] = set()
    for short, attr in BACKWARD_KERNELS.items():
        monkeypatch.setattr(kernels, attr, _LaunchSpy(getattr(kernels, attr), short, names))
    yield names


@pytest.mark.parametrize("stage", list(STAGES))
def test_frozen_inputs_cost_no_gradient_work(stage: str, launched: set[str]) -> None:
    routing, trainable = STAGES[stage]
    check_parity(Shape(70, 20, 30, 4, 4), routing, trainable=trainable)
    assert launched == EXPECTED_LAUNCHES[stage]


# --------------------------------------------------------------------------------------------
# GPU only: bf16 and the compiled kernels at larger shapes.
# --------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shape", [Shape(1024, 384, 256, 10, 16), Shape(4097, 256, 512, 32, 64),
                                   Shape(1000, 256, 128, 7, 1)],
                         ids=["seeds", "production, ragged N", "rank 1"])
def test_bf16_error_is_a_small_multiple_of_the_reference_bf16_error(shape: Shape,
                                                                    routing: str) -> None:
    inputs = make_inputs(shape, routing, dropout=0.5, dtype=torch.bfloat16)
    dy = torch.randn(shape.n, shape.d_out, device=DEVICE).to(torch.bfloat16)
    trainable = set(NAMES)
    y, grads = run(adapter_linear, inputs, dy, trainable, backend="fast")
    y_low, grads_low = run(reference_adapter_linear, inputs, dy, trainable)
    exact_in = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in inputs.items()}
    y_exact, grads_exact = run(reference_adapter_linear, exact_in, dy.float(), trainable)
    assert y.dtype == torch.bfloat16
    assert_close_relative_to_reference(y, y_low, y_exact, name="y")
    for name, got in grads.items():
        if grads_exact[name] is None:
            continue
        assert got is not None
        low = grads_low[name]
        assert low is not None
        assert_close_relative_to_reference(got, low, grads_exact[name], name=f"d{name}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("routing", ROUTINGS)
def test_compiled_fp32_at_production_shape(routing: str) -> None:
    check_parity(Shape(8193, 512, 256, 16, 32), routing, dropout=0.5)
