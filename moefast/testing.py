"""Parity tolerances shared by the tests and the benchmarks (STYLE.md habit 3).

One table per dtype. Low-precision parity is judged against an fp32/fp64 reference; for bf16
the kernel's error is bounded by a small multiple of the reference's own bf16 error
(:func:`assert_close_relative_to_reference`), as flash-attention does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BF16_UNIT_ROUNDOFF",
    "TOLERANCES",
    "TRAINING_LOSS_TOLERANCE",
    "TRAINING_PARITY_STEPS",
    "WAUC_PARITY_ATOL",
    "Tolerance",
    "assert_close_relative_to_reference",
    "tolerance",
    "wide_product_bound",
]


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


# fp32: sums of a few hundred products in a different order (blocked dot products, pooled
# bags) differ from torch by a few ulps of the running sum.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
    torch.float16: Tolerance(rtol=1e-3, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1e-2),
}

# A low-precision kernel may be at most this many times further from the exact answer than
# the reference computed in the same low precision.
LOW_PRECISION_ERROR_FACTOR = 3.0


def tolerance(dtype: torch.dtype) -> Tolerance:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no parity tolerance defined for dtype {dtype}") from None


def assert_close_relative_to_reference(
    actual: torch.Tensor, reference_low: torch.Tensor, exact: torch.Tensor, *, name: str = ""
) -> None:
    """Bound ``|actual - exact|`` by a small multiple of ``|reference_low - exact|``.

    ``exact`` is the fp32/fp64 answer, ``reference_low`` the reference computed in the same low
    precision as ``actual``. An absolute floor from the dtype's table keeps exact zeros fair.
    """
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item() if actual.numel() else 0.0
    ref_err = (reference_low.double() - exact).abs().max().item() if exact.numel() else 0.0
    floor = tolerance(actual.dtype).atol
    bound = LOW_PRECISION_ERROR_FACTOR * ref_err + floor
    if err > bound:
        raise AssertionError(
            f"{name or 'tensor'}: max error {err:.3g} exceeds {LOW_PRECISION_ERROR_FACTOR} x "
            f"reference error {ref_err:.3g} + {floor:.3g}"
        )

# bf16's unit roundoff: rounding to bf16 (8 significant bits) moves a value by at most u |v|.
BF16_UNIT_ROUNDOFF = 2.0**-8


def wide_product_bound(k: int, magnitude: torch.Tensor, products: int = 1) -> torch.Tensor:
    """How far two computations of the same bf16-mixed function may lie apart, elementwise:
    ``c K u sum|a||b|`` with ``u`` = :data:`BF16_UNIT_ROUNDOFF`.

    One wide product ``sum_i a_i b_i`` of reduction length ``K`` with operands rounded to bf16
    and fp32 accumulation errs by at most ``(2u + u^2 + gamma_K(2^-24)) sum|a||b|``, and
    rounding its result to bf16 (the CPU fast path, :mod:`moefast.precision`) adds
    ``u |sum a b|``; for ``K >= 4`` all of it is below ``K u sum|a||b|``. A result that passes
    through ``products`` wide products in a chain (a tower's layers forward, then backward)
    accumulates at most that many such terms, so ``c = products`` (first-order analysis: the
    ``u^2`` cross terms are left out), and two implementations of the specification differ by
    at most twice the bound of one; the factor 2 is in ``c``.

    ``magnitude``: ``sum|a||b|`` propagated to the compared tensor: the same computation in
    float64 with every input and weight replaced by its absolute value (the running-error
    analysis' ``|A| |x|``). ``k``: the longest reduction on the path.
    """
    if k < 1 or products < 1:
        raise ValueError(f"wide_product_bound needs k >= 1 and products >= 1, got {k}, {products}")
    return 2 * products * max(k, 4) * BF16_UNIT_ROUNDOFF * magnitude.abs().double()


# Backend parity of staged training (tests/test_fast_path.py). The reference and fast paths
# compute the same function and differ only in fp32 summation order (concatenated experts,
# blocked lookups), so each step's loss is held to the fp32 table; Adam carries a step's
# rounding into the next weights, which is why only the first TRAINING_PARITY_STEPS steps of
# each stage are compared step by step. Over a whole run the end metric is held to the issue's
# bound: test WAUC within WAUC_PARITY_ATOL.
TRAINING_LOSS_TOLERANCE = TOLERANCES[torch.float32]
TRAINING_PARITY_STEPS = 50
WAUC_PARITY_ATOL = 0.002
