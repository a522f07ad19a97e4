"""Fused adapter tower layer vs the plain PyTorch forms, side by side in one process (CUDA).

Providers (DESIGN.md section 7):

- ``loop``: :func:`moefast.reference.adapter.adapter_linear`, the seeds' loop over experts;
- ``concat``: :func:`moefast.reference.adapter.adapter_linear_concat`, experts concatenated, two
  cuBLAS products and one elementwise gate (the strongest plain form);
- ``fused``: :func:`moefast.ops.adapter_linear` with ``backend="fast"`` (the Triton kernels).

Modes: ``forward`` and ``train`` (forward + backward of every input: x, W, b, A, B, c, gate).
Every timed call ends with ``torch.cuda.synchronize()``.

Workloads:

- ``seeds``: the seeds' tower, three layers in -> 256 -> 128 -> 64 with ReLU, input 24 or 384,
  batch 1024 or 4096, E in {2, 7, 10, 20, 30}, ranks from the alpha table, a dense softmax gate
  (MoE-MLoRA), fp32 (the seeds train in fp32), dropout 0.5 on the shared path.
- ``production``: one layer width -> width, batch 65536, width 256 or 1024, rank 8 or 64, E 4 or
  32, routed by gate (MoE-MLoRA) or by domain ids (MLoRA), fp32 and bf16.

Each result's ``extra_info`` holds the device, shapes, dtype, FLOPs, the byte floor (every input
read once, every output written once), achieved GB/s and TFLOP/s, the device's measured ceilings
(a large device-to-device copy and a large ``torch.mm`` in the same dtype, measured once per run)
and ``roofline_fraction = max(bytes / bandwidth, flops / matmul) / time``: 1.0 is the roofline.
The fused provider, parametrised last, also records its speedups over the two peers measured
just before it on the same workload.

Run on a CUDA machine: ``make bench ARGS="-k adapter"``. The GPU benchmarks skip without CUDA;
``test_adapter_tower_cpu`` (CPU: what ``fast`` runs there, the CPU tower layer of
``moefast.ops._adapter_cpu``, against the loop and the plain concatenated form, on a few of the
seeds' shapes) runs anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from moefast.ops import adapter_linear
from moefast.reference.adapter import Activation, adapter_linear_concat
from moefast.reference.adapter import adapter_linear as loop_adapter_linear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
ROUNDS = 20
WARMUP_ROUNDS = 3
PROVIDERS = ["loop", "concat", "fused"]  # fused last: it reads the peers' medians
MODES = ["forward", "train"]
DROPOUT = 0.5

# alpha -> ranks of the (256, 128, 64) tower: r = max(units // alpha, 1) (DESIGN.md section 2).
ALPHAS = (4, 16, 32, 128, 256)


def _sync() -> None:
    torch.cuda.synchronize()


@dataclass(frozen=True)
class Layer:
    d_in: int
    d_out: int
    rank: int


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    layers: tuple[Layer, ...]
    experts: int
    routing: str  # "gate" (MoE-MLoRA), "domain" (MLoRA) or "expert" (an expert stage)
    dtype: torch.dtype

    def flops(self, mode: str) -> float:
        """Useful FLOPs: base products plus the adapter products the routing asks for."""
        total = 0.0
        visited = self.experts if self.routing == "gate" else 1
        for layer in self.layers:
            base = 2.0 * self.batch * layer.d_in * layer.d_out
            adapter = 2.0 * self.batch * visited * layer.rank * (layer.d_in + layer.d_out)
            # Backward: dx and the weight gradients each cost about one forward's products
            # ("adapters": dx and the small adapter gradients only, about one more).
            total += (base + adapter) * {"train": 3.0, "adapters": 2.0}.get(mode, 1.0)
        return total

    def bytes_floor(self, mode: str) -> float:
        """Bytes every implementation must move: inputs read once, outputs written once."""
        size = torch.empty((), dtype=self.dtype).element_size()
        n, e = self.batch, self.experts
        route = n * e * size if self.routing == "gate" else n * 8
        total = 0.0
        for layer in self.layers:
            params = (layer.d_out * (layer.d_in + 1)
                      + e * (layer.d_in * layer.rank + layer.rank * layer.d_out + layer.d_out))
            acts = n * (layer.d_in + 2 * layer.d_out)  # x, dropout mask, y
            fwd = (acts + params) * size + route
            if mode == "forward":
                total += fwd
            else:
                # + read dy, x, y, mask, gate; write dx, dgate and the parameter gradients.
                bwd = (n * (3 * layer.d_out + 2 * layer.d_in) + 2 * params) * size + 2 * route
                total += fwd + bwd
        return total


def _seeds_workloads() -> list[Workload]:
    out = []
    for batch in (1024, 4096):
        for d_in in (24, 384):
            for experts in (2, 7, 10, 20, 30):
                for alpha in ALPHAS:
                    widths = (d_in, 256, 128, 64)
                    layers = tuple(Layer(widths[i], widths[i + 1], max(widths[i + 1] // alpha, 1))
                                   for i in range(3))
                    out.append(Workload(f"seeds-n{batch}-in{d_in}-e{experts}-alpha{alpha}",
                                        batch, layers, experts, "gate", torch.float32))
    return out


def _production_workloads() -> list[Workload]:
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for routing in ("gate", "domain"):
            for width in (256, 1024):
                for rank in (8, 64):
                    for experts in (4, 32):
                        name = (f"prod-{str(dtype).removeprefix('torch.')}-{routing}-w{width}"
                                f"-r{rank}-e{experts}")
                        out.append(Workload(name, 65536, (Layer(width, width, rank),), experts,
                                            routing, dtype))
    return out


WORKLOADS = _seeds_workloads() + _production_workloads()


@dataclass
class Prepared:
    params: list[dict[str, torch.Tensor]]  # per layer: weight, bias, lora_A, lora_B, lora_c
    masks: list[torch.Tensor]
    x: torch.Tensor
    route: dict[str, Any]
    grad_out: torch.Tensor


def _prepare(w: Workload, device: str = DEVICE) -> Prepared:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=g, device=device) * scale
        return t.to(w.dtype).requires_grad_()

    params, masks = [], []
    for layer in w.layers:
        k, o, r, e = layer.d_in, layer.d_out, layer.rank, w.experts
        params.append({
            "weight": randn(o, k, scale=k**-0.5), "bias": randn(o, scale=0.1),
            "lora_A": randn(e, k, r, scale=k**-0.5), "lora_B": randn(e, r, o, scale=r**-0.5),
            "lora_c": randn(e, o, scale=0.1),
        })
        keep = torch.rand(w.batch, o, generator=g, device=device) >= DROPOUT
        masks.append(keep.to(w.dtype) / (1.0 - DROPOUT))
    x = randn(w.batch, w.layers[0].d_in)
    if w.routing == "gate":
        logits = torch.randn(w.batch, w.experts, generator=g, device=device)
        route: dict[str, Any] = {"gate": torch.softmax(logits, 1).to(w.dtype).requires_grad_()}
    elif w.routing == "expert":
        route = {"expert": w.experts // 2}
    else:
        route = {"domain": torch.randint(0, w.experts, (w.batch,), generator=g, device=device)}
    grad_out = torch.randn(w.batch, w.layers[-1].d_out, generator=g, device=device).to(w.dtype)
    return Prepared(params, masks, x, route, grad_out)


def _provider_fn(provider: str) -> Callable[..., torch.Tensor]:
    if provider == "loop":
        return loop_adapter_linear
    if provider == "concat":
        return adapter_linear_concat
    return lambda *a, **kw: adapter_linear(*a, **kw, backend="fast")


def _step(provider: str, mode: str, p: Prepared, sync: bool = True) -> Callable[[], None]:
    fn = _provider_fn(provider)
    inputs = [p.x, *(t for layer in p.params for t in layer.values())]
    if "gate" in p.route:
        inputs.append(p.route["gate"])
    inputs = [t for t in inputs if t.requires_grad]  # "adapters": the frozen ones get none

    def forward() -> torch.Tensor:
        h = p.x
        for layer, mask in zip(p.params, p.masks, strict=True):
            h = fn(h, layer["weight"], layer["bias"], layer["lora_A"], layer["lora_B"],
                   layer["lora_c"], dropout_mask=mask, activation=Activation.RELU, **p.route)
        return h

    if mode == "forward":
        def run() -> None:
            with torch.no_grad():
                forward()
            if sync:
                _sync()
    else:
        def run() -> None:
            torch.autograd.grad(forward(), inputs, p.grad_out)
            if sync:
                _sync()
    return run


def _time_once(fn: Callable[[], None], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    _sync()
    return start.elapsed_time(end) / 1e3 / iters


_CEILINGS: dict[str, float] = {}


def _ceilings(dtype: torch.dtype) -> dict[str, float]:
    """Measured device ceilings: copy bandwidth (bytes/s) and matmul throughput (FLOP/s).

    A 1 GiB device-to-device copy (read + write counted) and an 8192^3 ``torch.mm`` in the
    benchmark's dtype (fp32 with tf32 off, torch's default, like the IEEE products compared).
    """
    key = str(dtype)
    if "bandwidth" not in _CEILINGS:
        src = torch.empty(1 << 28, dtype=torch.float32, device=DEVICE)
        dst = torch.empty_like(src)
        seconds = min(_time_once(lambda: dst.copy_(src), 10) for _ in range(3))
        _CEILINGS["bandwidth"] = 2 * src.numel() * src.element_size() / seconds
        del src, dst
    if key not in _CEILINGS:
        a = torch.randn(8192, 8192, device=DEVICE).to(dtype)
        b = torch.randn(8192, 8192, device=DEVICE).to(dtype)
        seconds = min(_time_once(lambda: torch.mm(a, b), 5) for _ in range(3))
        _CEILINGS[key] = 2 * 8192**3 / seconds
        del a, b
    return {"bandwidth": _CEILINGS["bandwidth"], "matmul": _CEILINGS[key]}


_MEDIANS: dict[tuple[str, str, str], float] = {}


@needs_cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_adapter_tower(benchmark: Any, workload: Workload, mode: str, provider: str) -> None:
    ceil = _ceilings(workload.dtype)
    prepared = _prepare(workload)
    run = _step(provider, mode, prepared)
    benchmark.group = f"adapter {workload.name} {mode}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing timed
        return
    seconds = benchmark.stats.stats.median
    _MEDIANS[(workload.name, mode, provider)] = seconds
    flops, nbytes = workload.flops(mode), workload.bytes_floor(mode)
    info = {
        "device": torch.cuda.get_device_name(),
        "provider": provider,
        "mode": mode,
        "dtype": str(workload.dtype),
        "batch": workload.batch,
        "layers": [(layer.d_in, layer.d_out, layer.rank) for layer in workload.layers],
        "experts": workload.experts,
        "routing": workload.routing,
        "median_s": seconds,
        "flops": flops,
        "bytes_floor": nbytes,
        "gbps": nbytes / seconds / 1e9,
        "tflops": flops / seconds / 1e12,
        "ceiling_gbps": ceil["bandwidth"] / 1e9,
        "ceiling_tflops": ceil["matmul"] / 1e12,
        "roofline_fraction": max(nbytes / ceil["bandwidth"], flops / ceil["matmul"]) / seconds,
        "memory_bound": nbytes / ceil["bandwidth"] > flops / ceil["matmul"],
    }
    if provider == "fused":
        for peer in ("loop", "concat"):
            peer_s = _MEDIANS.get((workload.name, mode, peer))
            info[f"speedup_vs_{peer}"] = peer_s / seconds if peer_s else math.nan
    benchmark.extra_info.update(info)


# --------------------------------------------------------------------------------------------
# CPU: what ``fast`` means there (the CPU tower layer) against the seeds' loop and the plain
# concatenated form.
# --------------------------------------------------------------------------------------------

CPU_WORKLOADS = [w for w in _seeds_workloads()
                 if w.batch == 1024 and w.experts in (7, 30) and any(
                     f"alpha{a}" in w.name for a in (4, 32))]
# The expert stage of staged MoE-MLoRA (the bulk of its training steps): one expert routed.
CPU_WORKLOADS += [Workload(f"{w.name}-expert", w.batch, w.layers, w.experts, "expert", w.dtype)
                  for w in _seeds_workloads()
                  if w.batch == 1024 and w.experts == 10 and "alpha32" in w.name]
# "adapters": only lora_A / lora_B / lora_c train (x, W and b frozen), as in an expert stage.
CPU_MODES = [*MODES, "adapters"]


def _frozen_backbone(p: Prepared) -> Prepared:
    """``p`` with the layer input and the shared weights detached (they get no gradient)."""
    params = [{k: (v.detach() if k in ("weight", "bias") else v) for k, v in layer.items()}
              for layer in p.params]
    return Prepared(params, p.masks, p.x.detach(), p.route, p.grad_out)


@pytest.mark.parametrize("provider", ["loop", "concat", "fast"])
@pytest.mark.parametrize("mode", CPU_MODES)
@pytest.mark.parametrize("workload", CPU_WORKLOADS, ids=[w.name for w in CPU_WORKLOADS])
def test_adapter_tower_cpu(benchmark: Any, workload: Workload, mode: str, provider: str) -> None:
    """The seeds' tower on CPU: the reference loop and the plain concatenated form vs
    ``backend="fast"`` (the CPU tower layer).

    Run: ``make bench ARGS="-k adapter_tower_cpu"``. Threads: torch's default
    (``torch.get_num_threads()``, recorded in the machine info).
    """
    prepared = _prepare(workload, device="cpu")
    if mode == "adapters":
        prepared = _frozen_backbone(prepared)
    run = _step(provider, mode, prepared, sync=False)
    benchmark.group = f"adapter cpu {workload.name} {mode}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing timed
        return
    seconds = benchmark.stats.stats.median
    _MEDIANS[(workload.name, mode, f"cpu-{provider}")] = seconds
    info: dict[str, Any] = {
        "device": "cpu", "provider": provider, "mode": mode, "dtype": str(workload.dtype),
        "batch": workload.batch, "experts": workload.experts, "routing": workload.routing,
        "layers": [(layer.d_in, layer.d_out, layer.rank) for layer in workload.layers],
        "median_s": seconds, "gflops": workload.flops(mode) / seconds / 1e9,
    }
    if provider == "fast":
        for peer in ("loop", "concat"):
            peer_s = _MEDIANS.get((workload.name, mode, f"cpu-{peer}"))
            info[f"speedup_vs_{peer}"] = peer_s / seconds if peer_s else math.nan
    benchmark.extra_info.update(info)
