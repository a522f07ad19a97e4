"""The DNN tower of every backbone: base, MLoRA and MoE-MLoRA (DESIGN.md section 2).

Each hidden layer is an :class:`~moefast.nn.adapter.AdapterLinear` (ReLU, dropout on the shared
path only, then the adapter term); the output is ``Linear(last, 1)`` giving one logit per
sample. What the adapters contribute is set by the tower's :class:`Routing`, which the training
stages choose (``moefast.train.set_stage``); the module never switches on strings.

- base: no adapters; routing is always ``SHARED``.
- MLoRA: ``D`` adapters per layer; ``DOMAIN`` routes each sample to its own domain's adapter.
- MoE-MLoRA: ``E = experts_per_domain * D`` experts per layer, expert ``i`` belonging to domain
  ``i % D``; ``EXPERT`` applies one expert to every sample (that expert's training stage) and
  ``MIXTURE`` mixes all experts with the :class:`DomainGate`, computed once per sample and shared
  by every layer.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import torch
from torch import nn

from moefast import precision
from moefast.config import GateInit, TowerConfig, TowerKind
from moefast.nn.adapter import Activation, AdapterLinear
from moefast.ops._backend import Backend, BackendLike, resolve_backend
from moefast.ops._tower_cpu import tower_cpu
from moefast.ops.adapter import FastImpl, fast_implementation
from moefast.reference.adapter import check_domain_ids

__all__ = ["DomainGate", "Routing", "Tower", "check_specialist_start"]


class Routing(enum.Enum):
    """What the adapter term of every hidden layer is (see the module docstring)."""

    SHARED = "shared"
    DOMAIN = "domain"
    EXPERT = "expert"
    MIXTURE = "mixture"


_ALLOWED: dict[TowerKind, frozenset[Routing]] = {
    TowerKind.BASE: frozenset({Routing.SHARED}),
    TowerKind.MLORA: frozenset({Routing.SHARED, Routing.DOMAIN}),
    TowerKind.MOE_MLORA: frozenset({Routing.SHARED, Routing.EXPERT, Routing.MIXTURE}),
}

# What a freshly built tower computes: the method's full model.
_DEFAULT_ROUTING = {
    TowerKind.BASE: Routing.SHARED,
    TowerKind.MLORA: Routing.DOMAIN,
    TowerKind.MOE_MLORA: Routing.MIXTURE,
}


class DomainGate(nn.Module):
    """``g = softmax(Linear(dim -> E)(Embedding(D, dim)(domain)))``: a per-domain expert mixture.

    It sees only the domain id, so every sample of one domain gets the same weights: for a batch
    of more rows than there are domains, the gate is computed once per domain (:meth:`table`)
    and gathered per sample, which is the same function with ``D`` rows of work instead of
    ``N`` (on a 1024-row single-domain batch, a sixth of the forward and backward time).
    """

    def __init__(self, num_domains: int, num_experts: int, dim: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_domains, dim)
        self.linear = nn.Linear(dim, num_experts)

    @torch.no_grad()
    def start_on_own_experts(self, own_weight: float) -> float:
        """Set the gate so that every domain puts ``own_weight`` on its own experts
        (expert ``e`` belongs to domain ``e % D``); return the scale ``s`` that achieves it.

        The logits ``Linear(Embedding(d))`` have rank at most ``dim + 1``, so the gate cannot
        be an arbitrary ``[D, E]`` table. Domain ``d`` is placed at angle ``θ_d = 2π d / D`` on
        ``dim // 2`` circles of frequencies ``m_c`` (the embedding row holds
        ``sqrt(s / C) (cos m_c θ_d, sin m_c θ_d)`` for each circle, the linear row of an expert
        the same for its domain, the bias 0), so the logit of domain ``d`` for an expert of
        domain ``d'`` is ``s · mean_c cos(m_c (θ_d - θ_d'))``: ``s`` for its own experts, less
        for the others. The frequencies are chosen to need the smallest ``s`` (neighbouring
        domains on one circle are close; a second circle separates them), then ``s`` is found
        by bisection. Every own expert gets ``own_weight / k`` with ``k`` experts per domain.
        Embedding columns the circles do not use (one circle for ``D <= 3``, an odd last column,
        the sines at ``D = 2``) keep their random start and the linear's columns there are zero: the logits are as
        described, and both stay trainable (zero on both sides would never get a gradient).
        ``ValueError`` as :func:`check_specialist_start` says.
        """
        num_domains, dim = self.embedding.weight.shape
        num_experts = self.linear.out_features
        check_specialist_start(num_domains, dim, own_weight)
        self.linear.weight.zero_()
        self.linear.bias.zero_()
        if num_domains == 1:  # every expert is the one domain's own: a uniform start
            return 0.0
        frequencies, scale = _circle_layout(num_domains, dim // 2, own_weight)
        theta = 2 * math.pi * torch.arange(num_domains, dtype=torch.float64) / num_domains
        coords = [f(m * theta) for m in frequencies for f in (torch.cos, torch.sin)]
        points = torch.stack(coords, dim=1) * math.sqrt(scale / len(frequencies))  # [D, 2C]
        # A circle's column that is zero for every domain (the sines at D = 2) keeps its random
        # start too: the linear's column there is zero, so the logits are unchanged.
        used = torch.nonzero(points.abs().amax(dim=0) > 1e-9).squeeze(1)
        self.embedding.weight[:, used] = points[:, used].float()
        owner = torch.arange(num_experts) % num_domains
        self.linear.weight[:, : points.shape[1]] = points[owner].float()
        return scale

    @torch.no_grad()
    def start_like_keras(self) -> None:
        """The seeds' start: Keras' default initialisers, ``Embedding`` U(-0.05, 0.05) and
        ``Dense`` Glorot-uniform (limit ``sqrt(6 / (dim + E))``) with a zero bias. Every logit
        is then at most ``dim * 0.05 * limit`` in size (0.1 at ``dim = 4``, ``E = 20``): a
        near-uniform gate."""
        torch.nn.init.uniform_(self.embedding.weight, -0.05, 0.05)
        torch.nn.init.xavier_uniform_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def table(self) -> torch.Tensor:
        """``[D, E]``: row ``d`` is the gate of domain ``d``."""
        return torch.softmax(self.linear(self.embedding.weight), dim=-1)

    def forward(self, domain: torch.Tensor) -> torch.Tensor:
        """``domain`` int64 ``[N]`` -> gate weights float32 ``[N, E]`` (rows sum to 1)."""
        num_domains = self.embedding.num_embeddings
        if domain.device.type == "cpu":  # on CUDA, reading the ids would synchronise
            check_domain_ids(domain, num_domains, f"the gate has {num_domains} domains")
        if domain.dim() != 1 or domain.numel() <= num_domains:
            return torch.softmax(self.linear(self.embedding(domain)), dim=-1)
        return self.table().index_select(0, domain)


def check_specialist_start(num_domains: int, gate_dim: int, own_weight: float) -> None:
    """Refuse a specialist gate start that cannot be built: ``ValueError`` when ``own_weight``
    is not in ``[1/D, 1)`` or the gate embedding has fewer than 2 dims (for ``D > 1``). Callers
    run it before training (``moefast train`` checks once the data is loaded)."""
    if num_domains == 1:
        return
    if gate_dim < 2:
        raise ValueError(f"a specialist gate start needs a gate embedding of dim >= 2, got {gate_dim}")
    if not 1.0 / num_domains <= own_weight < 1.0:
        raise ValueError(
            f"gate own-expert weight {own_weight!r} must be in [1/D, 1) = [{1.0 / num_domains:.4g}, 1) "
            f"for D = {num_domains}"
        )


def _own_weight(similarity: torch.Tensor, scale: float) -> float:
    """The weight domain 0 puts on its own experts when its logit for domain ``j``'s experts is
    ``scale * similarity[j]`` (``similarity[0] = 1``); the same for every domain (circulant)."""
    return float(torch.softmax(scale * similarity, dim=0)[0])


def _circle_layout(num_domains: int, circles: int, own_weight: float) -> tuple[list[int], float]:
    """Frequencies (the first is 1) and the scale ``s`` of :meth:`DomainGate.start_on_own_experts`.

    Frequencies are added greedily while a new circle lowers the ``s`` needed for
    ``own_weight``; ``s`` comes from bisection (the own weight grows with ``s``, from ``1/D``
    at 0 towards 1)."""
    steps = torch.arange(num_domains, dtype=torch.float64) * (2 * math.pi / num_domains)

    def similarity(freqs: list[int]) -> torch.Tensor:
        return torch.stack([torch.cos(m * steps) for m in freqs]).mean(dim=0)

    def needed(freqs: list[int]) -> float:
        sim = similarity(freqs)
        if float(sim[1:].max()) >= 1.0 - 1e-12:
            return math.inf
        lo, hi = 0.0, 1.0
        while _own_weight(sim, hi) < own_weight:
            hi *= 2.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _own_weight(sim, mid) < own_weight else (lo, mid)
        return hi

    frequencies = [1]
    best = needed(frequencies)
    while len(frequencies) < circles:
        trials = [(needed([*frequencies, m]), m) for m in range(2, num_domains)]
        if not trials or min(trials)[0] >= best:
            break
        best, m = min(trials)
        frequencies.append(m)
    return frequencies, best


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook: its own, or one registered for every module
    (``torch.nn.modules.module.register_module_forward_hook`` and the like)."""
    g = torch.nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


class Tower(nn.Module):
    """Hidden layers of :class:`AdapterLinear` plus ``Linear(last, 1)``.

    Args:
        in_features: width of the tower input.
        config: units, dropout, ranks, kind and experts per domain.
        num_domains: ``D``.
        backend: passed to every :class:`AdapterLinear` (``reference`` | ``fast`` | ``auto``).
    """

    def __init__(
        self, in_features: int, config: TowerConfig, num_domains: int, *, backend: BackendLike = None
    ) -> None:
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"a tower needs at least one domain, got num_domains={num_domains}")
        self.config = config
        self.kind = config.kind
        self.num_domains = num_domains
        self.num_experts = config.num_experts(num_domains)
        widths = (in_features, *config.hidden_units)
        # AdapterLinear needs E >= 1. The base tower's layers carry one rank-1 adapter that is
        # never routed to and never trained (B = c = 0, so it would be a no-op anyway): the base
        # tower keeps the same layer and the same fused kernel as the adapter towers.
        ranks = config.layer_ranks if self.num_experts else (1,) * len(config.hidden_units)
        self.layers = nn.ModuleList(
            AdapterLinear(
                widths[k], widths[k + 1], max(self.num_experts, 1), rank,
                dropout=config.dropout, backend=backend,
            )
            for k, rank in enumerate(ranks)
        )
        self.output = nn.Linear(widths[-1], 1)
        self.gate = (
            DomainGate(num_domains, self.num_experts, config.gate_dim)
            if config.kind is TowerKind.MOE_MLORA
            else None
        )
        if self.gate is not None and config.gate_init is GateInit.SPECIALIST:
            self.gate.start_on_own_experts(config.gate_own_weight)
        elif self.gate is not None and config.gate_init is GateInit.KERAS:
            self.gate.start_like_keras()
        self.routing = _DEFAULT_ROUTING[config.kind]
        self.active_expert: int | None = None

    def set_routing(self, routing: Routing, expert: int | None = None) -> None:
        """Choose the adapter term; ``expert`` is required for (and only for) ``EXPERT``."""
        if routing not in _ALLOWED[self.kind]:
            raise ValueError(f"a {self.kind.value} tower has no {routing.value!r} routing")
        if (routing is Routing.EXPERT) != (expert is not None):
            raise ValueError(f"routing {routing.value!r} with expert={expert!r}")
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} outside [0, {self.num_experts})")
        self.routing = routing
        self.active_expert = expert

    def set_shared_dropout(self, active: bool) -> None:
        """Draw (``True``) or skip the hidden layers' dropout masks on the shared path in
        training mode (:attr:`moefast.config.TrainConfig.frozen_path_dropout`)."""
        for layer in self.hidden_layers():
            layer.dropout_active = active

    def expert_domain(self, expert: int) -> int:
        """The domain expert ``expert`` belongs to: ``expert % D``."""
        return expert % self.num_domains

    def gate_weights(self, domain: torch.Tensor) -> torch.Tensor:
        """``[N, E]`` mixture weights for int64 ``domain [N]`` (MoE-MLoRA only)."""
        if self.gate is None:
            raise ValueError(f"a {self.kind.value} tower has no gate")
        return self.gate(domain)

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """``x`` float32 ``[N, in]``, ``domain`` int64 ``[N]`` -> logits float32 ``[N]``."""
        routing = self._routing_args(domain)
        if self._runs_fused(x):
            layers = self.hidden_layers()
            # Drawn in layer order before any layer runs: the bits the per-layer path draws.
            masks = [layer.dropout_mask_for(x) for layer in layers]
            params = [(layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_c) for layer in layers]
            return tower_cpu(x, params, self.output.weight, self.output.bias, masks=masks,
                             bf16=precision.bf16_mixed(), **routing)
        h = x
        for layer in self.layers:
            h = layer(h, **routing)
        return self.output(h).squeeze(-1)

    def _routing_args(self, domain: torch.Tensor) -> dict[str, Any]:
        """What every hidden layer is called with under the current routing: nothing, its
        ``domain`` ids, its ``expert`` or the ``gate`` (computed once per sample, shared by all
        layers)."""
        if self.routing is Routing.DOMAIN:
            return {"domain": domain}
        if self.routing is Routing.EXPERT:
            return {"expert": self.active_expert}
        if self.routing is Routing.MIXTURE:
            return {"gate": self.gate_weights(domain)}
        return {}

    def _runs_fused(self, x: torch.Tensor) -> bool:
        """Whether this call runs as one node (:mod:`moefast.ops._tower_cpu`): on CPU, when every
        hidden layer resolves to the fast CPU layer, unless hooks or a replaced layer need the
        per-layer modules called (or ``torch.compile`` is tracing, which sees the layers)."""
        if x.device.type != "cpu" or x.dim() != 2 or torch.compiler.is_compiling():
            return False
        if type(self.output) is not nn.Linear or self.output.bias is None or _hooked(self.output):
            return False
        impl, why_not = fast_implementation(x)
        if impl is not FastImpl.CONCAT:
            return False
        for layer in self.layers:
            if type(layer) is not AdapterLinear or layer.activation is not Activation.RELU or _hooked(layer):
                return False
            if resolve_backend("adapter_linear", why_not, layer.backend) is not Backend.FAST:
                return False
        return True

    def hidden_layers(self) -> list[AdapterLinear]:
        layers = []
        for layer in self.layers:
            assert isinstance(layer, AdapterLinear)
            layers.append(layer)
        return layers

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every layer's ``lora_A``, ``lora_B``, ``lora_c`` (empty for the base tower)."""
        if self.num_experts == 0:
            return []
        return [p for layer in self.hidden_layers() for p in (layer.lora_A, layer.lora_B, layer.lora_c)]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared path: every layer's ``weight`` and ``bias`` and the output layer."""
        params = [p for layer in self.hidden_layers() for p in (layer.weight, layer.bias)]
        return [*params, *self.output.parameters()]

    def gate_parameters(self) -> list[nn.Parameter]:
        return [] if self.gate is None else list(self.gate.parameters())
