"""Dropout masks: the native CPU generator draws exactly torch's bits and leaves the generator
exactly where torch.rand would (moefast.ops.dropout, csrc/dropout.cpp)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moefast import _ext
from moefast.nn import AdapterLinear
from moefast.ops import dropout_mask
from moefast.reference import dropout as reference

native = pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")

# Shapes around the 623-draw runs between twists of torch's mt19937, and a training-size one.
SHAPES = [(0, 5), (1,), (7, 3), (622,), (623,), (624,), (625,), (1246,), (1247,), (3, 1000), (1024, 256)]
PROBS = [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]


def _draw(backend: str, shape: tuple[int, ...], p: float, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask from a generator advanced by ``offset`` draws, and the 9 draws after it."""
    torch.manual_seed(seed)
    torch.rand(offset)
    mask = dropout_mask(shape, p, backend=backend)
    return mask, torch.rand(9)


@native
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", PROBS)
def test_fast_mask_is_torch_rand_bit_for_bit(shape: tuple[int, ...], p: float) -> None:
    for seed, offset in ((0, 0), (7, 1), (2**40 + 3, 622), (123, 1000)):
        mask, after = _draw("fast", shape, p, seed, offset)
        want_mask, want_after = _draw("reference", shape, p, seed, offset)
        assert mask.dtype == torch.float32 and mask.shape == shape
        assert torch.equal(mask, want_mask), (seed, offset)
        assert torch.equal(after, want_after), (seed, offset)  # the generator moved as torch's


@native
def test_mask_values_and_rate() -> None:
    torch.manual_seed(3)
    mask = dropout_mask((512, 512), 0.3, backend="fast")
    assert set(mask.unique().tolist()) == {0.0, torch.ones(1).div_(0.7).item()}
    assert abs(float((mask == 0).float().mean()) - 0.3) < 0.005  # 262k draws: std 0.0009


@native
def test_explicit_generator_is_used_and_advanced() -> None:
    gen, twin = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    torch.manual_seed(0)
    default_before = torch.default_generator.get_state()
    a = dropout_mask((100, 30), 0.5, generator=gen, backend="fast")
    b = reference.dropout_mask((100, 30), 0.5, generator=twin)
    assert torch.equal(a, b)
    assert torch.equal(gen.get_state(), twin.get_state())
    assert torch.equal(torch.default_generator.get_state(), default_before)


@native
def test_adapter_layer_draws_the_same_masks_under_both_backends() -> None:
    outputs = []
    for backend in ("reference", "fast"):
        torch.manual_seed(5)
        layer = AdapterLinear(16, 32, 3, 2, dropout=0.4, backend=backend)
        x = torch.randn(64, 16)
        outputs.append((layer(x, expert=1), layer(x, expert=1)))
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@native
def test_baseline_and_avx2_generators_agree() -> None:
    """``MOEFAST_DISABLE_AVX2=1`` selects the baseline clone; both must match torch."""
    code = (
        "import torch\n"
        "from moefast.ops import dropout_mask\n"
        "torch.manual_seed(1); a = dropout_mask((999, 77), 0.25, backend='fast')\n"
        "torch.manual_seed(1); b = torch.rand(999, 77).lt_(0.75).div_(0.75)\n"
        "assert torch.equal(a, b)\n"
    )
    for disable in ("0", "1"):
        env = {**os.environ, "MOEFAST_DISABLE_AVX2": disable}
        subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize(
    ("shape", "p", "message"),
    [
        ((4, -1), 0.5, r"non-negative int sizes, got \(4, -1\)"),
        ((4, 2.0), 0.5, r"non-negative int sizes"),
        ((4,), -0.1, r"p must lie in \[0, 1\], got -0.1"),
        ((4,), 1.5, r"p must lie in \[0, 1\], got 1.5"),
        ((4,), True, r"p must lie in \[0, 1\], got True"),
    ],
)
def test_bad_arguments_name_the_value(shape: tuple, p: float, message: str) -> None:
    for backend in ("reference", "auto"):
        with pytest.raises(ValueError, match=message):
            dropout_mask(shape, p, backend=backend)


def test_fast_draws_with_torch_rand_where_the_native_generator_does_not_apply() -> None:
    """float64 (or CUDA, or no extension): every backend draws with torch.rand, same bits."""
    for backend in ("fast", "auto", "reference"):
        torch.manual_seed(2)
        got = dropout_mask((4, 4), 0.5, dtype=torch.float64, backend=backend)
        torch.manual_seed(2)
        assert torch.equal(got, torch.rand(4, 4, dtype=torch.float64).lt_(0.5).div_(0.5)), backend


def test_reference_request_never_calls_the_native_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ext, "native", lambda: pytest.fail("native generator called"))
    dropout_mask((8, 8), 0.5, backend="reference")
    monkeypatch.setenv("MOEFAST_BACKEND", "reference")
    dropout_mask((8, 8), 0.5)


@native
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s[:-1], r"5056 bytes, got 5055"),
        (lambda s: _poke(s, 8, 0), r"left=0"),  # int32 left
        (lambda s: _poke(s, 8, 625), r"left=625"),
        (lambda s: _poke(s, 12, 0), r"seeded=0"),  # int32 seeded
        (lambda s: _poke(s, 16, 700), r"next=700"),  # uint64 next
        (lambda s: _poke(_poke(s, 8, 100), 16, 600), r"next \+ left > 625"),  # reads past 623
    ],
)
def test_native_rejects_a_bad_state_and_leaves_it_alone(edit, message: str) -> None:
    state = edit(torch.Generator().manual_seed(4).get_state())
    before = state.clone()
    out = torch.full((100,), 7.0)
    with pytest.raises(ValueError, match=message):
        _ext.native().dropout_mask(state, out, 1 << 23, 2.0)
    assert torch.equal(state, before) and bool((out == 7.0).all())


@native
def test_native_rejects_bad_sizes_and_types() -> None:
    state = torch.Generator().manual_seed(4).get_state()
    with pytest.raises(ValueError, match=r"keep_below must lie in \[0, 2\^24\], got 16777217"):
        _ext.native().dropout_mask(state, torch.empty(3), (1 << 24) + 1, 2.0)
    with pytest.raises(TypeError):
        _ext.native().dropout_mask(state, torch.empty(3, dtype=torch.float64), 1, 2.0)
    with pytest.raises(TypeError):
        _ext.native().dropout_mask(state.to(torch.int32), torch.empty(3), 1, 2.0)


def _poke(state: torch.Tensor, offset: int, value: int) -> torch.Tensor:
    """``state`` with the little-endian int at byte ``offset`` set to ``value`` (4 or 8 bytes
    as the layout has it: left and seeded are int32, next is uint64)."""
    width = 8 if offset == 16 else 4
    out = state.clone()
    out[offset : offset + width] = torch.tensor(list(value.to_bytes(width, "little")), dtype=torch.uint8)
    return out
