"""The reference adapter layer: the loop form, the concatenated form and the module.

The two plain forms must agree with each other and with a float64 evaluation; routing
invariants (one-hot gate == domain ids == single expert) and the module's init are checked.
"""

from __future__ import annotations

import pytest
import torch

from moefast.nn import Activation, AdapterLinear
from moefast.reference.adapter import adapter_linear, adapter_linear_concat
from moefast.testing import tolerance

FORMS = [adapter_linear, adapter_linear_concat]


def _params(n: int, d_in: int, d_out: int, e: int, r: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, d_in, generator=g),
        "weight": torch.randn(d_out, d_in, generator=g) / d_in**0.5,
        "bias": torch.randn(d_out, generator=g),
        "lora_A": torch.randn(e, d_in, r, generator=g) / d_in**0.5,
        "lora_B": torch.randn(e, r, d_out, generator=g) / r**0.5,
        "lora_c": torch.randn(e, d_out, generator=g),
    }


def _call(form, p: dict[str, torch.Tensor], **kw):  # type: ignore[no-untyped-def]
    return form(p["x"], p["weight"], p["bias"], p["lora_A"], p["lora_B"], p["lora_c"], **kw)


def _expected_gate(p: dict[str, torch.Tensor], gate: torch.Tensor, mask: torch.Tensor | None,
                   activation: Activation) -> torch.Tensor:
    """Row by row, in float64: the formula of DESIGN.md section 4 written out literally."""
    d = {k: v.double() for k, v in p.items()}
    rows = []
    for n in range(d["x"].shape[0]):
        x = d["x"][n]
        z = d["weight"] @ x + d["bias"]
        if mask is not None:
            z = z * mask[n].double()
        for e in range(gate.shape[1]):
            z = z + gate[n, e].double() * (x @ d["lora_A"][e] @ d["lora_B"][e] + d["lora_c"][e])
        rows.append(torch.relu(z) if activation is Activation.RELU else z)
    return torch.stack(rows)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("activation", list(Activation))
def test_gate_matches_row_by_row_formula(form, activation: Activation) -> None:  # type: ignore[no-untyped-def]
    p = _params(9, 12, 7, 3, 2)
    gate = torch.softmax(torch.randn(9, 3), dim=1)
    mask = (torch.rand(9, 7) > 0.5).float() * 2.0
    got = _call(form, p, gate=gate, dropout_mask=mask, activation=activation)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(got.double(), _expected_gate(p, gate, mask, activation),
                               rtol=tol.rtol, atol=tol.atol)


@pytest.mark.parametrize("form", FORMS)
def test_routings_are_the_one_hot_gate(form) -> None:  # type: ignore[no-untyped-def]
    p = _params(10, 8, 6, 4, 3)
    domain = torch.tensor([0, 3, 3, 1, 0, 0, 1, 3, 3, 3])  # domain 2 has no rows
    one_hot = torch.nn.functional.one_hot(domain, 4).float()
    tol = tolerance(torch.float32)
    torch.testing.assert_close(_call(form, p, domain=domain), _call(form, p, gate=one_hot),
                               rtol=tol.rtol, atol=tol.atol)
    every_row_expert_1 = torch.zeros(10, 4)
    every_row_expert_1[:, 1] = 1.0
    torch.testing.assert_close(_call(form, p, expert=1), _call(form, p, gate=every_row_expert_1),
                               rtol=tol.rtol, atol=tol.atol)
    base = torch.relu(p["x"] @ p["weight"].T + p["bias"])
    torch.testing.assert_close(_call(form, p), base, rtol=tol.rtol, atol=tol.atol)


def test_forms_agree_on_gradients() -> None:
    p = {k: v.requires_grad_() for k, v in _params(11, 10, 5, 3, 2).items()}
    gate = torch.softmax(torch.randn(11, 3), dim=1).requires_grad_()
    grads = []
    for form in FORMS:
        y = _call(form, p, gate=gate)
        grads.append(torch.autograd.grad((y * y).sum(), [*p.values(), gate]))
    tol = tolerance(torch.float32)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tol.rtol, atol=tol.atol)


@pytest.mark.parametrize("form", FORMS)
def test_empty_batch(form) -> None:  # type: ignore[no-untyped-def]
    p = _params(0, 8, 6, 2, 2)
    assert _call(form, p, gate=torch.zeros(0, 2)).shape == (0, 6)
    assert _call(form, p, domain=torch.zeros(0, dtype=torch.int64)).shape == (0, 6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gate": torch.zeros(4, 2), "expert": 0}, ValueError, "at most one of gate, domain, expert"),
        ({"gate": torch.zeros(4, 3)}, ValueError, r"gate must be \[4, 2\]"),
        ({"domain": torch.tensor([0, 1, 2, 0])}, ValueError, "domain id 2"),
        ({"domain": torch.tensor([0, -1, 1, 0])}, ValueError, "domain id -1"),
        ({"domain": torch.zeros(4, dtype=torch.int32)}, TypeError, "int64"),
        ({"expert": 2}, ValueError, "expert 2"),
        ({"dropout_mask": torch.ones(4, 5)}, ValueError, r"dropout_mask must be \[4, 6\]"),
    ],
)
def test_bad_inputs_name_the_value(kwargs, error, match) -> None:  # type: ignore[no-untyped-def]
    p = _params(4, 8, 6, 2, 3)
    for form in FORMS:
        with pytest.raises(error, match=match):
            _call(form, p, **kwargs)


def test_module_init_and_linear_layout() -> None:
    torch.manual_seed(0)
    layer = AdapterLinear(24, 16, 3, 4)
    assert layer.weight.shape == (16, 24) and layer.bias.shape == (16,)
    assert layer.lora_A.shape == (3, 24, 4) and layer.lora_B.shape == (3, 4, 16)
    assert layer.lora_c.shape == (3, 16)
    assert not layer.bias.any() and not layer.lora_B.any() and not layer.lora_c.any()
    bound = (6.0 / (24 + 4)) ** 0.5
    assert 0.5 * bound < layer.lora_A.abs().max() <= bound
    linear = torch.nn.Linear(24, 16)
    layer.load_state_dict({**layer.state_dict(), "weight": linear.weight, "bias": linear.bias})
    x = torch.randn(5, 24)
    # B and c start at zero: every routing gives the plain Linear + ReLU.
    want = torch.relu(linear(x))
    tol = tolerance(torch.float32)
    for kw in ({}, {"expert": 2}, {"domain": torch.tensor([0, 1, 2, 2, 0])},
               {"gate": torch.rand(5, 3)}):
        torch.testing.assert_close(layer(x, **kw), want, rtol=tol.rtol, atol=tol.atol)


def test_module_dropout_only_in_training_and_only_on_shared_path() -> None:
    torch.manual_seed(0)
    layer = AdapterLinear(8, 64, 2, 2, dropout=0.5, activation=Activation.NONE)
    with torch.no_grad():
        layer.lora_c.fill_(3.0)
        layer.weight.fill_(0.25)
    x = torch.ones(32, 8)
    layer.eval()
    torch.testing.assert_close(layer(x, expert=0), torch.full((32, 64), 5.0))
    layer.train()
    y = layer(x, expert=0)
    # Base 2.0 is dropped (-> 0) or scaled by 2 (-> 4); the adapter's 3.0 is always added.
    assert set(y.unique().tolist()) == {3.0, 7.0}
