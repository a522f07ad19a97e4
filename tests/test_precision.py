"""bf16 mixed precision (issue 27): ``TrainConfig.precision = bf16-mixed``.

- the fast tower forms (the C++ node, the Python node, the per-layer op) match the bf16
  reference within the derived bound (:func:`moefast.testing.wide_product_bound`), forward and
  every gradient, for each tower kind and routing;
- the operands reaching the wide products are bf16 (dispatch inspection on the fast path,
  the rounding the reference applies on the reference path), so a bf16-mixed that silently
  computes fp32 fails; results differ from fp32;
- every backbone's bf16-mixed step on both backends is no further from the fp32 answer than a
  small multiple of the bf16 reference's own error (STYLE habit 3);
- the CUDA selection (the Triton kernels' bf16 path) by dispatch inspection, the option's CLI and
  config plumbing, its error on a device nothing serves, and checkpoint round trip / resume
  bitwise at one thread under bf16-mixed.
fp32 staying bitwise unchanged is what every other suite checks.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moefast import _ext, data, models, precision
from moefast.cli._options import TRAIN_OPTIONS, converters
from moefast.config import Precision, TowerConfig, TowerKind, TrainConfig
from moefast.nn.tower import Routing, Tower
from moefast.ops import adapter as adapter_ops
from moefast.testing import assert_close_relative_to_reference, wide_product_bound
from moefast.train.loop import _set_backend

sys.path.insert(0, str(Path(__file__).parent))

IN, UNITS, RANKS, ROWS, DOMAINS = 24, (32, 16), (4, 2), 40, 3
BF16 = Precision.BF16_MIXED

# (tower kind, routing, expert): every routing a training stage uses.
CASES = [
    (TowerKind.BASE, Routing.SHARED, None),
    (TowerKind.MLORA, Routing.DOMAIN, None),
    (TowerKind.MOE_MLORA, Routing.EXPERT, 4),
    (TowerKind.MOE_MLORA, Routing.MIXTURE, None),
]


def _tower(kind: TowerKind, routing: Routing, expert: int | None, backend: str) -> Tower:
    torch.manual_seed(3)
    tower = Tower(IN, TowerConfig(kind=kind, hidden_units=UNITS, ranks=RANKS, experts_per_domain=2), DOMAINS,
                  backend=backend)
    with torch.no_grad():  # adapters that contribute (B = c = 0 at init)
        for layer in tower.hidden_layers():
            layer.lora_B.normal_(0.0, 0.3)
            layer.lora_c.normal_(0.0, 0.1)
    tower.set_routing(routing, expert)
    return tower.eval()  # no dropout: every form sees the same function


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(ROWS, IN, generator=gen)
    domain = torch.randint(0, DOMAINS, (ROWS,), generator=gen)
    return x, domain


def _run(tower: Tower, x: torch.Tensor, domain: torch.Tensor, prec: Precision) -> list[torch.Tensor]:
    """``[logits, dx, every parameter's gradient]`` of ``sum(logits)``."""
    tower.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with precision.autocast(prec):
        logits = tower(x, domain)
    logits.sum().backward()
    assert x.grad is not None
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tower.parameters()]
    return [logits.detach(), x.grad, *grads]


def _magnitude(tower: Tower, x: torch.Tensor, domain: torch.Tensor) -> list[torch.Tensor]:
    """``sum|a||b|`` propagated to every compared tensor: the same computation in float64 on the
    reference path with every weight and input replaced by its absolute value."""
    absolute = copy.deepcopy(tower).double()
    for layer in absolute.hidden_layers():
        layer.backend = None
    with torch.no_grad():
        for p in absolute.parameters():
            p.abs_()
    for layer in absolute.hidden_layers():
        layer.backend = "reference"  # type: ignore[assignment]
    return _run(absolute, x.abs().double(), domain, Precision.FP32)


@pytest.fixture
def python_node(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The tower runs as the Python node (what an install without ``moefast._tower_ops`` runs)."""
    monkeypatch.setattr(_ext, "tower_op_available", lambda warn=True: False)
    yield


def _per_layer(tower: Tower) -> Tower:
    """The same tower run layer by layer (a hook makes the tower call its layers)."""
    tower.layers[0].register_forward_hook(lambda *args: None)
    return tower


FORMS = ["cpp-node", "python-node", "per-layer"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("kind", "routing", "expert"), CASES, ids=[f"{k.value}-{r.value}" for k, r, _ in CASES])
def test_fast_tower_matches_the_bf16_reference_within_the_bound(
    form: str, kind: TowerKind, routing: Routing, expert: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if form == "python-node":
        monkeypatch.setattr(_ext, "tower_op_available", lambda warn=True: False)
    elif form == "cpp-node" and not _ext.tower_op_available(warn=False):
        pytest.skip("moefast._tower_ops is not built")
    x, domain = _inputs()
    fast = _tower(kind, routing, expert, "fast")
    if form == "per-layer":
        _per_layer(fast)
    reference = _tower(kind, routing, expert, "reference")
    got = _run(fast, x, domain, BF16)
    want = _run(reference, x, domain, BF16)
    fp32 = _run(fast, x, domain, Precision.FP32)
    scale = _magnitude(reference, x, domain)
    # The longest reduction on the path: a layer's input width, or the rows (weight gradients).
    k = max(IN, *UNITS, ROWS)
    names = ["logits", "x", *(name for name, _ in fast.named_parameters())]
    for name, a, b, m in zip(names, got, want, scale, strict=True):
        bound = wide_product_bound(k, m, products=2 * len(UNITS))
        err = (a.double() - b.double()).abs()
        assert bool((err <= bound).all()), f"{name}: error {float(err.max()):.3g} above the bound"
    # bf16-mixed is not fp32: the logits and the first layer's weight gradient differ.
    assert not torch.equal(got[0], fp32[0])
    assert not torch.equal(got[2], fp32[2])


class _Products(TorchDispatchMode):
    """Records the dtypes of every matrix product's operands."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        if name in ("moefast.mm_bf16", "aten.mm", "aten.addmm", "aten.bmm"):
            self.calls.append((name, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))

    def wide(self) -> list[list[torch.dtype]]:
        return [dtypes for name, dtypes in self.calls if name == "moefast.mm_bf16"]


@pytest.mark.parametrize("form", FORMS)
def test_the_wide_products_of_the_fast_path_get_bf16_operands(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if form == "python-node":
        monkeypatch.setattr(_ext, "tower_op_available", lambda warn=True: False)
    tower = _tower(TowerKind.MOE_MLORA, Routing.MIXTURE, None, "fast")
    if form == "per-layer":
        _per_layer(tower)
    x, domain = _inputs()
    x.requires_grad_(True)
    for prec, forward_wide in ((BF16, len(UNITS)), (Precision.FP32, 0)):
        with _Products() as forward, precision.autocast(prec):
            logits = tower(x, domain)
        with _Products() as backward:
            logits.sum().backward()
        # One wide product per layer forward ([x W^T | x A]); dx and [dW ; dA] per layer backward.
        assert len(forward.wide()) == forward_wide
        assert len(backward.wide()) == 2 * forward_wide
        for dtypes in forward.wide() + backward.wide():
            assert dtypes == [torch.bfloat16, torch.bfloat16]


def test_the_python_twin_of_mm_bf16_computes_the_native_op() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(33, 70, generator=gen).to(torch.bfloat16)
    b = torch.randn(20, 70, generator=gen).to(torch.bfloat16).T  # a transposed operand
    got = precision.mm_bf16(a, b)
    assert got.dtype == torch.float32
    assert torch.equal(precision._mm_bf16_cpu(a, b), got)
    exact = a.double() @ b.double()
    assert bool(((got.double() - exact).abs() <= wide_product_bound(70, a.double().abs() @ b.double().abs()) / 2).all())


def test_the_reference_rounds_the_wide_operands(monkeypatch: pytest.MonkeyPatch) -> None:
    rounded: list[tuple[int, ...]] = []
    plain = precision.round_bf16

    def recording(t: torch.Tensor) -> torch.Tensor:
        rounded.append(tuple(t.shape))
        return plain(t)

    monkeypatch.setattr(precision, "round_bf16", recording)
    tower = _tower(TowerKind.MLORA, Routing.DOMAIN, None, "reference")
    x, domain = _inputs()
    _run(tower, x, domain, Precision.FP32)
    assert rounded == []
    _run(tower, x, domain, BF16)
    # Forward: each layer's input and its weight (transposed), then each adapter's A_e.
    widths = (IN, *UNITS)
    for k in range(len(UNITS)):
        assert (ROWS, widths[k]) in rounded and (widths[k], widths[k + 1]) in rounded
        assert (widths[k], RANKS[k]) in rounded
    assert (ROWS, UNITS[-1]) in rounded  # a backward gradient operand ([N, out] of the last layer)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_backbone_follows_bf16_mixed_on_both_backends(name: str) -> None:
    ds = data.load("synthetic", preset="paper", rows=120, num_domains=2, num_users=20, num_items=15)
    batch = ds.train.rows(torch.arange(48))
    results: dict[tuple[str, Precision], list[torch.Tensor]] = {}
    # The tower kinds and routings are the tower tests' (above); here the backbones' own parts.
    for kind in ("moe-mlora",):
        for backend in ("reference", "fast"):
            for prec in (Precision.FP32, BF16):
                model = models.build(name, ds, kind, seed=11, tower_config=TowerConfig(hidden_units=(32, 16), dropout=0.0))
                model.train()
                for layer in model.tower.hidden_layers():
                    with torch.no_grad():
                        layer.lora_B.normal_(0.0, 0.3)
                _set_backend(model, backend)
                with precision.autocast(prec):
                    logits = model(batch.features, batch.domain)
                logits.sum().backward()
                grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                         for p in model.parameters()]
                results[(backend, prec)] = [logits.detach(), *grads]
        exact = results[("reference", Precision.FP32)]
        for got, ref, want in zip(results[("fast", BF16)], results[("reference", BF16)], exact, strict=True):
            assert_close_relative_to_reference(got, ref, want, name=f"{name} {kind}")
        for backend in ("reference", "fast"):  # bf16-mixed is not fp32
            pairs = zip(results[(backend, BF16)], results[(backend, Precision.FP32)], strict=True)
            assert any(not torch.equal(a, b) for a, b in pairs)


def test_cuda_bf16_mixed_selects_the_triton_bf16_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """What reaches the kernels under bf16-mixed: x, W and A in bf16 (the wide products'
    operands), B, b, c, the gate and the mask in fp32, checked with the launchers replaced by a
    recorder (the interpreter cannot run bf16 products; the numerics are the gpu tests')."""
    seen: dict[str, torch.dtype] = {}

    class Kernels:
        @staticmethod
        def adapter_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lora_A: torch.Tensor,
                               lora_B: torch.Tensor, lora_c: torch.Tensor, gate: Any, *rest: Any) -> Any:
            seen.update(x=x.dtype, weight=weight.dtype, bias=bias.dtype, lora_A=lora_A.dtype,
                        lora_B=lora_B.dtype, lora_c=lora_c.dtype, gate=gate.dtype)
            return torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype), torch.zeros(0)

    monkeypatch.setattr(adapter_ops, "_kernels", lambda: Kernels)
    layer = _tower(TowerKind.MOE_MLORA, Routing.MIXTURE, None, "fast").hidden_layers()[0]
    x, _ = _inputs()
    gate = torch.softmax(torch.randn(ROWS, layer.num_experts), dim=-1)
    y = adapter_ops._triton_bf16_mixed(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_c,
                                       gate, None, None, None, True)
    assert y.dtype == torch.float32
    assert seen == {"x": torch.bfloat16, "weight": torch.bfloat16, "lora_A": torch.bfloat16,
                    "bias": torch.float32, "lora_B": torch.float32, "lora_c": torch.float32, "gate": torch.float32}


def test_the_triton_interpreter_refuses_bf16_mixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(adapter_ops.TRITON_CPU_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2, 3)
    assert adapter_ops.fast_implementation(x)[0] is adapter_ops.FastImpl.TRITON
    impl, why = adapter_ops.fast_implementation(x, bf16=True)
    assert impl is None and why is not None and "bf16-mixed" in why


def test_the_option_parses_and_refuses_bad_values_naming_it() -> None:
    assert TrainConfig().precision is Precision.FP32
    assert converters(TRAIN_OPTIONS)["precision"]("bf16-mixed") is BF16
    with pytest.raises(TypeError, match="precision"):
        TrainConfig(precision="bf16-mixed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"TrainConfig\.precision"):
        precision.parse_precision("fp8")
    with pytest.raises(ValueError, match=r"--precision bf16-mixed \(TrainConfig\.precision\)"):
        precision.check_device(BF16, "meta")
    assert precision.check_device(Precision.FP32, "meta") is Precision.FP32
    assert precision.current() is Precision.FP32


def test_a_cpu_without_bf16_units_warns_once_naming_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_warned", False)
    with pytest.warns(precision.PrecisionWarning, match="avx512_bf16"):
        text = precision.check_cpu(frozenset({"avx2", "fma"}))
    assert text is not None and "\n" not in text
    assert precision.check_cpu(frozenset({"avx512f", "avx512_bf16"})) is None
    assert precision.check_cpu(frozenset({"amx_bf16"})) is None


def test_checkpoints_and_resume_under_bf16_mixed_are_bitwise_at_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    import _resume_run as tiny
    from test_resume import assert_same_run

    whole, cut = tiny.cut_and_resume(tmp_path, monkeypatch, "precision", precision=BF16, max_epochs=2)
    assert json.loads((whole / "metrics.json").read_text())["precision"] == "bf16-mixed"
    assert json.loads((whole / "settings.json").read_text())["train"]["precision"] == "bf16-mixed"
    assert_same_run(cut, whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("kind", "routing", "expert"), CASES, ids=[f"{k.value}-{r.value}" for k, r, _ in CASES])
def test_triton_bf16_mixed_matches_the_bf16_reference_within_the_bound(
    kind: TowerKind, routing: Routing, expert: int | None
) -> None:
    """The numerics of the CUDA path: the Triton kernels' bf16 path against the bf16 reference,
    forward and every gradient, within the derived bound."""
    x, domain = _inputs()
    x, domain = x.cuda(), domain.cuda()
    fast = _tower(kind, routing, expert, "fast").cuda()
    reference = _tower(kind, routing, expert, "reference").cuda()
    got = _run(fast, x, domain, BF16)
    want = _run(reference, x, domain, BF16)
    fp32 = _run(fast, x, domain, Precision.FP32)
    scale = _magnitude(reference, x, domain)
    k = max(IN, *UNITS, ROWS)
    for name, a, b, m in zip(["logits", "x", *(n for n, _ in fast.named_parameters())], got, want, scale, strict=True):
        err = (a.double() - b.double()).abs()
        assert bool((err <= wide_product_bound(k, m, products=2 * len(UNITS))).all()), name
    assert not torch.equal(got[0], fp32[0])
