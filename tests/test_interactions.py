"""Known answers for every interaction layer, on small inputs worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from moefast.models.deepfm import fm_interaction
from moefast.nn.interaction import (
    CIN,
    SENET,
    BilinearInteraction,
    CrossNet,
    InteractingLayer,
    bi_interaction,
    inner_products,
)
from moefast.testing import tolerance

TOL = tolerance(torch.float64)

# v1 = (1, 2), v2 = (3, -1), v3 = (0, 2): <v1,v2> = 1, <v1,v3> = 4, <v2,v3> = -2.
FIELDS = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.0, 2.0]]], dtype=torch.float64)


def close(actual: torch.Tensor, expected: list[object]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=TOL.rtol, atol=TOL.atol)


def test_fm_second_order_term() -> None:
    close(fm_interaction(FIELDS), [1.0 + 4.0 - 2.0])


def test_bi_interaction_pooling() -> None:
    # v1*v2 = (3, -2), v1*v3 = (0, 4), v2*v3 = (0, -2)
    close(bi_interaction(FIELDS), [[3.0, 0.0]])


def test_inner_products_in_pair_order() -> None:
    close(inner_products(FIELDS), [[1.0, 4.0, -2.0]])


def test_cross_network_two_layers() -> None:
    cross = CrossNet(2, 2).double()
    with torch.no_grad():
        cross.kernels.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        cross.biases.copy_(torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    x0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    # x1 = x0 (x0.w0) + b0 + x0 = -(1, 2) + (0.5, 0) + (1, 2) = (0.5, 0)
    # x2 = x0 (x1.w1) + b1 + x1 = (1, 2) + (0, 1) + (0.5, 0) = (1.5, 3)
    close(cross(x0), [[1.5, 3.0]])


def test_cin_two_layers_split_half() -> None:
    cin = CIN(2, (2, 1)).double()
    assert cin.output_width == 2  # 1 map kept of layer 1, 1 of layer 2
    with torch.no_grad():
        # Layer 1 reads Z = [v1*v1, v1*v2, v2*v1, v2*v2] = [(1,4), (3,-2), (3,-2), (9,1)].
        cin.convs[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]]).unsqueeze(2))
        cin.convs[0].bias.zero_()
        # Layer 2 reads [h*v1, h*v2] with h = relu(3, -2) = (3, 0): [(3, 0), (9, 0)].
        cin.convs[1].weight.copy_(torch.tensor([[[1.0], [-1.0]]]))
        cin.convs[1].bias.fill_(1.0)
    fields = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], dtype=torch.float64)
    # Layer 1: map 0 = relu(3, -2) goes on (the first half); map 1 = relu((1,4) + (9,1)),
    # summed = 15, is kept (the second half).
    # layer 2: relu((3,0) - (9,0) + 1) = (0, 1), summed = 1.
    close(cin(fields), [[15.0, 1.0]])


def test_cin_rejects_odd_inner_sizes() -> None:
    with pytest.raises(ValueError, match="even sizes"):
        CIN(3, (3, 2))


def test_multi_head_self_attention_with_residual() -> None:
    layer = InteractingLayer(2, heads=2).double()
    with torch.no_grad():
        for w in (layer.query, layer.key, layer.value):
            w.copy_(torch.eye(2))
        assert layer.residual is not None
        layer.residual.copy_(torch.diag(torch.tensor([1.0, -1.0])))
    fields = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    # Head 0 sees component 0: scores [[1, 0], [0, 0]], values (1, 0) -> (s, 1/2) with
    # s = e / (e + 1); head 1 likewise on component 1 -> (1/2, s).
    # Field 1: (s, 1/2) + (1, 0) = (1 + s, 1/2). Field 2: (1/2, s) + (0, -1) -> relu -> (1/2, 0).
    s = math.e / (math.e + 1)
    close(layer(fields), [[[1 + s, 0.5], [0.5, 0.0]]])


def test_attention_heads_must_divide_the_dim() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        InteractingLayer(6, heads=4)


def test_senet_reweights_fields() -> None:
    senet = SENET(3, reduction=3).double()
    with torch.no_grad():
        senet.squeeze.weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
        senet.excite.weight.copy_(torch.tensor([[1.0], [-1.0], [2.0]]))
    fields = torch.tensor([[[1.0, 3.0], [-2.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    # z = field means (2, -1, 0.5); relu(sum z) = 1.5; a = relu(1.5, -1.5, 3) = (1.5, 0, 3).
    close(senet(fields), [[[1.5, 4.5], [0.0, 0.0], [3.0, 0.0]]])


def test_bilinear_interaction_per_pair() -> None:
    bilinear = BilinearInteraction(3, 2).double()
    with torch.no_grad():
        bilinear.weight.copy_(torch.tensor([
            [[0.0, 1.0], [1.0, 0.0]],  # pair (1, 2): v1 W^T = (2, 1)
            [[1.0, 1.0], [0.0, 1.0]],  # pair (1, 3): v1 W^T = (3, 2); v1 W would be (1, 3)
            [[1.0, 0.0], [0.0, 2.0]],  # pair (2, 3): v2 W^T = (3, -2)
        ]))
    # (2, 1) * v2 = (6, -1); (3, 2) * v3 = (0, 4); (3, -2) * v3 = (0, -4)
    close(bilinear(FIELDS), [[[6.0, -1.0], [0.0, 4.0], [0.0, -4.0]]])
