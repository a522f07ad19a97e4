"""The exact per-domain merge of an adapter tower (DESIGN.md section 12).

The MoE-MLoRA gate sees only the domain id and dropout is off at inference, so per domain ``d``
every hidden layer's adapter term is a fixed low-rank matrix and bias:

- MLoRA: ``W_d = W + A_d B_d``, ``b_d = b + c_d``;
- MoE-MLoRA: ``W_d = W + sum_e g_de A_e B_e``, ``b_d = b + sum_e g_de c_e`` with ``g = gate.table()``;
- the expert stage's routing (one expert for every row): ``W_d = W + A_e B_e``;
- the base tower (or the shared routing): ``W_d = W``.

:class:`MergedTower` holds ``[D, in, out]`` stacked weights and runs the rows of each domain as
one dense product with that domain's matrix: the rows are grouped by a stable sort on the
domain id, never multiplied by a per-row gathered ``[N, in, out]`` weight, so it costs what the
base tower costs plus one sort, one gather and one scatter of the rows.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from moefast.models.base import CTRModel
from moefast.nn.adapter import Activation, AdapterLinear
from moefast.nn.embedding import EmbeddingCollection
from moefast.nn.tower import DomainGate, Routing, Tower
from moefast.ops._backend import BackendLike, parse_backend
from moefast.reference.adapter import check_domain_ids

__all__ = ["MergedModel", "MergedTower", "domain_mixture", "merge", "merge_tower"]


def domain_mixture(tower: Tower) -> torch.Tensor:
    """float64 ``[D, E]``: the weight each domain gives each adapter under the tower's current
    routing (rows of zeros for the shared routing, one-hot rows for MLoRA and the expert stage,
    the gate's table for the mixture).

    ``ValueError`` for a gate that is not moefast's :class:`DomainGate` (a gate that sees more
    than the domain has no per-domain merge).
    """
    num_domains, num_experts = tower.num_domains, max(tower.num_experts, 1)
    routing = tower.routing
    if routing is Routing.SHARED:
        return torch.zeros(num_domains, num_experts, dtype=torch.float64)
    if routing is Routing.DOMAIN:
        if num_experts != num_domains:
            raise ValueError(f"domain routing needs one adapter per domain, got E={num_experts}, D={num_domains}")
        return torch.eye(num_domains, dtype=torch.float64)
    if routing is Routing.EXPERT:
        assert tower.active_expert is not None
        mix = torch.zeros(num_domains, num_experts, dtype=torch.float64)
        mix[:, tower.active_expert] = 1.0
        return mix
    gate = tower.gate
    if type(gate) is not DomainGate:
        raise ValueError(
            f"merge: the tower's gate is a {type(gate).__name__}, not moefast's DomainGate; only a "
            "gate that sees nothing but the domain id has an exact per-domain merge"
        )
    with torch.no_grad():
        # The model's own fp32 table: the weights its eval forward mixes with.
        return gate.table().double().cpu()  # [D, E]


def _check_mergeable(tower: nn.Module) -> Tower:
    """The tower, if it is moefast's plain adapter tower; ``ValueError`` naming what is not."""
    if type(tower) is not Tower:
        raise ValueError(f"merge: the model's tower is a {type(tower).__name__}, not moefast's Tower")
    for k, layer in enumerate(tower.layers):
        if type(layer) is not AdapterLinear:
            raise ValueError(f"merge: tower layer {k} is a {type(layer).__name__}, not an AdapterLinear")
        if layer.activation is not Activation.RELU:
            raise ValueError(f"merge: tower layer {k} has activation {layer.activation.name}, expected RELU")
    if type(tower.output) is not nn.Linear or tower.output.bias is None:
        raise ValueError("merge: the tower's output layer must be an nn.Linear with a bias")
    return tower


class MergedTower(nn.Module):
    """The tower with every domain's adapters folded in: ``relu(x W_d + b_d)`` per hidden layer,
    then the shared ``Linear(last, 1)``.

    Args:
        weights: per hidden layer, float ``[D, in, out]`` (row-major ``x @ W_d``).
        biases: per hidden layer, float ``[D, out]``.
        output: the tower's output layer (``Linear(last, 1)``), copied.

    Forward: ``x`` float32 ``[N, in]``, ``domain`` int64 ``[N]`` in ``[0, D)`` -> logits float32
    ``[N]``. Rows are grouped by domain (a sort on the domain id) and each group goes through its
    domain's matrices as one dense product (:meth:`grouped_forward`). On CPU, outside tracing, the
    same runs as one C++ op (``torch.ops.moefast.merged_tower``) whose (domain, row chunk) units
    share one parallel region: as a Python loop every product is a parallel region of its own,
    which cost 2x at 2 threads (docs/serving.md).
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], output: nn.Linear) -> None:
        super().__init__()
        if not weights or len(weights) != len(biases):
            raise ValueError(f"merged tower needs one bias per weight, got {len(weights)} and {len(biases)}")
        self.num_domains = int(weights[0].shape[0])
        for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
            if w.dim() != 3 or w.shape[0] != self.num_domains or tuple(b.shape) != (self.num_domains, w.shape[2]):
                raise ValueError(f"merged layer {k}: weight {tuple(w.shape)} and bias {tuple(b.shape)} "
                                 f"are not [D, in, out] and [D, out] with D={self.num_domains}")
            self.register_buffer(f"weight_{k}", w.contiguous())
            self.register_buffer(f"bias_{k}", b.contiguous())
        self.num_layers = len(weights)
        self.output = copy.deepcopy(output).requires_grad_(False)

    def layer(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden layer ``k``'s ``([D, in, out], [D, out])``."""
        return getattr(self, f"weight_{k}"), getattr(self, f"bias_{k}")

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        num_domains = self.num_domains
        tracing = torch.compiler.is_compiling()
        if not tracing and domain.device.type == "cpu":  # on CUDA, reading the ids would synchronise
            check_domain_ids(domain, num_domains, f"the merged model has {num_domains} domains")
            op = _merged_tower_op()
            if op is not None and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
                layers = [self.layer(k) for k in range(self.num_layers)]
                return op(x, domain, [w for w, _ in layers], [b for _, b in layers],
                          self.output.weight, self.output.bias)
        return self.grouped_forward(x, domain)

    def grouped_forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """The forward in torch ops: the specification of ``torch.ops.moefast.merged_tower``,
        what ``torch.export`` traces, and what runs on CUDA or without the C++ op."""
        num_domains = self.num_domains
        tracing = torch.compiler.is_compiling()
        # Rows per domain as a [D] tensor whatever the ids: bincount's length would depend on
        # the data, which torch.export cannot trace.
        counts = torch.zeros(num_domains, dtype=torch.int64, device=domain.device)
        counts = counts.index_add(0, domain, torch.ones_like(domain))
        # [N]: rows grouped by domain. Not a stable sort: ONNX has none (aten.sort.stable does not
        # convert), and the order within a group does not matter, each row goes back to its place.
        order = torch.argsort(domain)
        grouped = x.index_select(0, order)  # [N, in]
        sizes = counts.tolist()
        if tracing:  # tell torch.export what the data-dependent sizes satisfy
            for size in sizes:
                torch._check(size >= 0)
            torch._check(sum(sizes) == grouped.shape[0])
        layers = [self.layer(k) for k in range(self.num_layers)]
        parts = []
        for d, part in enumerate(grouped.split(sizes)):
            if not tracing and sizes[d] == 0:  # eager only: an export cannot branch on a count
                continue
            h = part  # [n_d, in]
            for weight, bias in layers:
                h = torch.addmm(bias[d], h, weight[d]).relu_()  # [n_d, out]; in place: a fresh tensor
            parts.append(h)
        hidden = torch.cat(parts) if parts else x.new_zeros(0, layers[-1][0].shape[2])  # [N, last]
        logits = self.output(hidden).squeeze(-1)  # [N], grouped order
        return torch.empty_like(logits).index_copy(0, order, logits)


_MERGED_OP: list[Any] = []


def _merged_tower_op() -> Any:
    """``torch.ops.moefast.merged_tower`` (``csrc/ops/tower.cpp``: this forward in C++, its
    (domain, row chunk) units in one parallel region), or None where ``moefast._tower_ops`` is not
    built for this torch or predates the op; then the Python loop below runs (same function)."""
    if not _MERGED_OP:
        from moefast import _ext

        op = None
        if _ext.tower_op_refusal() is None:
            try:
                _ext.tower_op()
                op = torch.ops.moefast.merged_tower
            except (RuntimeError, AttributeError):  # not loadable, or built before the op existed
                op = None
        _MERGED_OP.append(op)
    return _MERGED_OP[0]


def merge_tower(tower: Tower) -> MergedTower:
    """A :class:`MergedTower` computing what ``tower`` computes in eval mode under its current
    routing (float64 products, rounded once to the tower's dtype)."""
    tower = _check_mergeable(tower)
    mix = domain_mixture(tower)  # [D, E]
    weights, biases = [], []
    with torch.no_grad():
        for layer in tower.hidden_layers():
            dtype, device = layer.weight.dtype, layer.weight.device
            a, b, c = (p.detach().double().cpu() for p in (layer.lora_A, layer.lora_B, layer.lora_c))
            delta = torch.einsum("de,eir,ero->dio", mix, a, b)  # [D, in, out]
            w = layer.weight.detach().double().cpu().T.unsqueeze(0) + delta  # [D, in, out]
            bias = layer.bias.detach().double().cpu().unsqueeze(0) + mix @ c  # [D, out]
            weights.append(w.to(dtype=dtype, device=device))
            biases.append(bias.to(dtype=dtype, device=device))
    return MergedTower(weights, biases, tower.output)


class MergedModel(nn.Module):
    """A trained backbone with its tower merged per domain: a plain inference module.

    It keeps the backbone's own feature path (embeddings, first-order weights, numeric fields,
    interaction part, :meth:`CTRModel.tower_input`) and swaps only the tower for a
    :class:`MergedTower`, so ``forward(features, domain)`` takes what the trained model takes
    and returns its eval logits float32 ``[B]``. Built by :func:`merge`; no gradients, eval only.
    """

    def __init__(self, backbone: CTRModel) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = backbone.name
        self.num_domains = backbone.num_domains
        self.features = backbone.features
        self.numeric = tuple(getattr(backbone, "numeric", ()))

    def forward(self, features: Mapping[str, torch.Tensor], domain: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(features, domain)

    def train(self, mode: bool = True) -> MergedModel:
        if mode:
            raise ValueError("a merged model is for inference only; it has no training mode")
        return super().train(False)


def merge(model: CTRModel, *, backend: BackendLike = None) -> MergedModel:
    """Fold ``model``'s adapters into per-domain tower weights (DESIGN.md section 12).

    Args:
        model: a trained :func:`moefast.models.build` model (base, MLoRA or MoE-MLoRA), under any
            routing; the merge computes what its eval forward computes under that routing.
        backend: the embedding lookup of the merged model (``reference`` = torch's own ops, which
            :func:`moefast.export.export_program` needs; ``fast`` = the C++ engine); default: the
            model's.

    Returns:
        a :class:`MergedModel` (a copy: ``model`` is not changed), in eval mode, without the
        embedding optimizers' state, equal to ``model.eval()(features, domain)`` within fp32
        rounding.

    Raises:
        ValueError: the tower is not moefast's plain adapter tower, or its gate sees more than
            the domain id.
    """
    if not isinstance(model, CTRModel):
        raise TypeError(f"merge expects a moefast CTRModel, got {type(model).__name__}")
    tower = merge_tower(model.tower)
    # Copy everything but the tower, which the memo maps to the merged one (``model`` itself is
    # never touched).
    backbone = copy.deepcopy(model, memo={id(model.tower): tower})
    chosen = None if backend is None else parse_backend(backend)
    for module in backbone.modules():
        if isinstance(module, EmbeddingCollection):
            module.set_optimizer(None)
            if chosen is not None:
                module.backend = chosen
    backbone.requires_grad_(False)
    merged = MergedModel(backbone)
    merged.eval()
    return merged
