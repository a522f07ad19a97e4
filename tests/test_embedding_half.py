"""Half-precision tables (float16, bfloat16): lookup, fused update with stochastic rounding, SIMD
clones.

The lookup converts each element exactly and pools in float32, so it is judged against the
float32 lookup of the float32 table within a bound derived from the half type's own rounding
error (``assert_close_relative_to_reference``, STYLE habit 3). The update is bitwise: fast ==
reference, at any thread count, in every SIMD clone.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from test_embedding import FAST, make_fields, run_op

from moefast import _ext
from moefast.config import Pooling
from moefast.ops import embedding as ops_embedding
from moefast.ops import embedding_collection
from moefast.reference.embedding_optim import (
    FusedOptimizer,
    LazyAdam,
    RowwiseAdagrad,
    rounding_bits,
    stochastic_round,
    table_key,
)
from moefast.testing import assert_close_relative_to_reference

BACKENDS = ["reference", FAST]
HALF = [torch.float16, torch.bfloat16]
CONFIGS = [RowwiseAdagrad(lr=0.1, seed=7), LazyAdam(lr=0.05, seed=7)]
CONFIG_IDS = ["adagrad", "lazy_adam"]
needs_ext = pytest.mark.skipif(not _ext.available(), reason="moefast._C not built")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_lookup_matches_float32_within_the_half_types_error(backend: str, dtype: torch.dtype) -> None:
    """Every field kind (gather, int32 ids, weighted sum, mean with padding, dims 1..64): against
    the float32 lookup of the float32 tables, the half lookup's error is at most a small multiple
    of the reference's own (half tables, float32 pooling); the reference equals the float32
    lookup of the converted tables to float32 rounding."""
    fields = make_fields(64, seed=3)
    exact = run_op(fields, [f.weight for f in fields], "reference")
    halves = [f.weight.to(dtype) for f in fields]
    reference_low = run_op(fields, halves, "reference")
    out = run_op(fields, halves, backend)
    assert out.dtype == torch.float32
    assert_close_relative_to_reference(out, reference_low, exact, name=f"{backend} {dtype}")
    widened = run_op(fields, [h.float() for h in halves], "reference")
    torch.testing.assert_close(out, widened, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_table_gets_a_gradient_of_its_own_dtype(backend: str) -> None:
    """Without a fused optimizer a half table gets an ordinary gradient, in its dtype."""
    fields = make_fields(16, seed=4)
    weights = [f.weight.to(torch.bfloat16).requires_grad_() for f in fields]
    run_op(fields, weights, backend).sum().backward()
    assert all(w.grad is not None and w.grad.dtype == torch.bfloat16 for w in weights)


def _single_id_update(
    weight: torch.Tensor, state: dict[str, torch.Tensor], rows: torch.Tensor, grads: torch.Tensor,
    config: FusedOptimizer, backend: str,
) -> None:
    """The fused update of ``rows`` with summed gradients ``grads`` (one id per bag, so both
    backends sum exactly the same gradient)."""
    out = embedding_collection(
        [weight], [rows], [torch.arange(rows.numel() + 1)], [Pooling.SUM], names=["item"],
        optimizer=config, optimizer_states=[state], backend=backend,
    )
    out.backward(grads)


@needs_ext
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dim", [1, 5, 16, 64])
def test_fused_update_is_bitwise_equal_to_the_reference(dtype: torch.dtype, config: FusedOptimizer, dim: int) -> None:
    """Several steps of the fused update on random rows: the engine's table and state equal the
    reference's bit for bit (same float32 arithmetic, same rounding bits)."""
    g = torch.Generator().manual_seed(dim)
    start = torch.randn(300, dim, generator=g).to(dtype)
    results = []
    for backend in ("reference", "fast"):
        weight = start.clone().requires_grad_()
        state = config.init_state(weight)
        for step in range(4):
            rows = torch.randperm(300, generator=torch.Generator().manual_seed(step))[:120].sort().values
            grads = torch.randn(120, dim, generator=torch.Generator().manual_seed(10 + step))
            _single_id_update(weight, state, rows, grads, config, backend)
        results.append((weight.detach(), state))
    (w_ref, s_ref), (w_fast, s_fast) = results
    assert w_fast.dtype == dtype and not torch.equal(w_fast, start)
    assert torch.equal(_bits(w_fast), _bits(w_ref))
    for slot, value in s_ref.items():
        assert s_fast[slot].dtype == value.dtype  # float32 state (int64 steps)
        assert torch.equal(s_fast[slot], value), slot


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("magnitude", [1.5, 2.0**-20], ids=["normal", "subnormal"])
def test_stochastic_rounding_is_unbiased_where_round_to_nearest_is_not(
    dtype: torch.dtype, sign: float, magnitude: float
) -> None:
    """x = v + 0.3 ulp for a representable v: round-to-nearest gives v (0.3 ulp low); the
    stochastic rounding's mean over n = 40,000 draws (bits of 40,000 rows) is within 6 standard
    errors (6 * sqrt(0.21 / n) ulp = 0.014 ulp) of x, a bound round-to-nearest misses 20 times
    over; both neighbours occur. Subnormal: fp16's fixed spacing 2^-24 (bf16 has no subnormals
    there, 2^-20 is normal for it)."""
    v = torch.tensor(sign * magnitude, dtype=dtype)
    smallest_normal_exponent = torch.tensor(torch.finfo(dtype).tiny).log2().item()
    exponent = max(torch.tensor(magnitude).log2().floor().item(), smallest_normal_exponent)
    ulp = torch.tensor(torch.finfo(dtype).eps * 2.0**exponent)  # the spacing at v
    assert (v.abs().float() + ulp).to(dtype).float() == v.abs().float() + ulp  # the next value
    x = (v.float().abs() + 0.3 * ulp) * sign  # exact in float32
    n = 40_000
    rows = torch.arange(n)
    bits = rounding_bits(123, table_key("t"), rows, torch.ones(n, dtype=torch.int64), 1)
    rounded = stochastic_round(x.expand(n, 1).contiguous(), dtype, bits).float()
    error_in_ulps = ((rounded.mean() - x) / ulp).abs().item()
    bound = 6 * (0.21 / n) ** 0.5
    assert error_in_ulps < bound
    nearest_error = ((x.to(dtype).float() - x) / ulp).abs().item()
    assert nearest_error > 20 * bound  # the test would reject round-to-nearest
    assert set(rounded.unique().tolist()) == {v.item(), (v.abs().float() + ulp).item() * sign}


@pytest.mark.parametrize("dtype", HALF)
def test_stochastic_rounding_keeps_representable_values_and_specials(dtype: torch.dtype) -> None:
    values = torch.tensor([0.0, -0.0, 1.0, -3.5, float("inf"), float("-inf")]).to(dtype)
    bits = rounding_bits(1, 2, torch.arange(6), torch.zeros(6, dtype=torch.int64), 1)
    assert torch.equal(_bits(stochastic_round(values.float()[:, None], dtype, bits)[:, 0]), _bits(values))
    nan = stochastic_round(torch.tensor([[float("nan")]]), dtype, bits[:1])
    assert nan.isnan().all()


@needs_ext
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_half_update_does_not_depend_on_thread_count(monkeypatch: pytest.MonkeyPatch, config: FusedOptimizer) -> None:
    """Rounding bits come from a hash, not a per-thread generator: bitwise the same at 1, 2 and
    4 threads (every field kind, float16 and bfloat16 tables in one call)."""
    monkeypatch.setattr(ops_embedding, "LOOKUPS_PER_THREAD", 1)  # small batches use every thread
    fields = make_fields(256, seed=7)
    grad_out = torch.randn(256, sum(f.weight.shape[1] for f in fields), generator=torch.Generator().manual_seed(2))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            weights = [f.weight.to(HALF[t % 2]).requires_grad_() for t, f in enumerate(fields)]
            states = [config.init_state(w) for w in weights]
            for _ in range(2):
                run_op(fields, weights, "fast", optimizer=config, optimizer_states=states).backward(grad_out)
            results.append([_bits(w.detach()) for w in weights])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@needs_ext
def test_rounding_depends_on_the_seed() -> None:
    weight = torch.full((50, 8), 1.0, dtype=torch.bfloat16)
    grads = torch.full((50, 8), 1e-3)
    outs = []
    for seed in (0, 1):
        w = weight.clone().requires_grad_()
        config = LazyAdam(lr=1e-3, seed=seed)
        _single_id_update(w, config.init_state(w), torch.arange(50), grads, config, "fast")
        outs.append(_bits(w.detach()))
    assert not torch.equal(outs[0], outs[1])


_CLONE_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_embedding import make_fields, run_op
from moefast import _ext
from moefast.reference.embedding_optim import LazyAdam, RowwiseAdagrad
fields = make_fields(300, seed=9)
grad_out = torch.randn(300, sum(f.weight.shape[1] for f in fields), generator=torch.Generator().manual_seed(1))
saved = {"level": _ext.native().simd_level()}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for name, config in (("adagrad", RowwiseAdagrad(lr=0.1, seed=3)), ("adam", LazyAdam(lr=0.1, seed=3))):
        weights = [f.weight.to(dtype).requires_grad_() for f in fields]
        states = [config.init_state(w) for w in weights]
        # fields 0 and 5 also as one shared table (the grouped update path)
        shared = weights + [weights[0]]
        shared_fields = fields + [fields[0]]
        for _ in range(2):
            out = run_op(shared_fields, shared, "fast", optimizer=config, optimizer_states=states + [states[0]])
            out.backward(torch.cat([grad_out, grad_out[:, :8]], 1))
        saved[f"{dtype}-{name}"] = [out.detach(), *(w.detach().float() for w in weights)]
torch.save(saved, sys.argv[1])
"""


def _cpu_has_avx512() -> bool:
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "f16c"))


@needs_ext
def test_avx512_avx2_and_baseline_clones_agree_bitwise(tmp_path: pathlib.Path) -> None:
    """Each clone forced by its environment variable (read once per process, hence the
    subprocesses): AVX-512 == AVX2 == baseline, bit for bit, for float32 and half tables, both
    optimizers and a shared table. Without AVX-512 the AVX-512 leg is skipped, unless
    MOEFAST_REQUIRE_AVX512=1 makes that a failure."""
    script = tmp_path / "run.py"
    script.write_text(_CLONE_SCRIPT)
    legs = {"avx512": {}, "avx2": {"MOEFAST_DISABLE_AVX512": "1"}, "baseline": {"MOEFAST_DISABLE_AVX2": "1"}}
    running = {}
    for level, overrides in legs.items():  # side by side: each is mostly torch's import
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOEFAST_DISABLE_")} | overrides
        running[level] = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"{level}.pt"), str(pathlib.Path(__file__).parent)], env=env
        )
    assert all(process.wait() == 0 for process in running.values())
    results = {level: torch.load(tmp_path / f"{level}.pt") for level in legs}
    if results["avx512"]["level"] != "avx512":
        required = os.environ.get("MOEFAST_REQUIRE_AVX512", "0") not in ("", "0")
        assert not required, f"MOEFAST_REQUIRE_AVX512=1 but the engine runs {results['avx512']['level']!r}"
        assert not _cpu_has_avx512() or results["avx512"]["level"] == "avx2"
        del results["avx512"]
    assert results.get("baseline", {}).get("level") == "baseline"
    levels = list(results)
    for name in results[levels[0]]:
        if name == "level":
            continue
        for other in levels[1:]:
            for a, b in zip(results[levels[0]][name], results[other][name], strict=True):
                assert torch.equal(a, b), (name, levels[0], other)
    if len(levels) < 3:
        pytest.skip("no AVX-512 (F, BW, VL) on this CPU: compared AVX2 with baseline only")


def test_half_tables_with_dense_adam_are_refused_in_one_line() -> None:
    from moefast.config import EmbeddingOptimizer, TablePrecision, TrainConfig

    with pytest.raises(ValueError, match="--embedding-optimizer") as info:
        TrainConfig(table_precision=TablePrecision.BF16)
    assert "\n" not in str(info.value)
    config = TrainConfig(table_precision=TablePrecision.FP16, embedding_optimizer=EmbeddingOptimizer.LAZY_ADAM)
    assert config.table_precision.dtype == torch.float16


def test_collection_precision_checkpoint_round_trip_and_mismatch_refused(tmp_path: pathlib.Path) -> None:
    """Tables stored in their own precision (2 bytes an element, in the tensors and the file);
    a round trip is exact; loading into another precision is refused until converted."""
    from moefast.config import FeatureSpec, TablePrecision
    from moefast.nn import EmbeddingCollection
    from moefast.runs.checkpoint import load_checkpoint, save_checkpoint

    specs = [FeatureSpec("a", 4000, 16), FeatureSpec("b", 30, 8, Pooling.SUM)]
    torch.manual_seed(0)
    full = EmbeddingCollection(specs, init_std=0.1, optimizer=LazyAdam())
    torch.manual_seed(0)
    half = EmbeddingCollection(specs, init_std=0.1, optimizer=LazyAdam(), precision=TablePrecision.BF16)
    assert half.precision is TablePrecision.BF16
    assert all(t.element_size() == 2 and torch.equal(t, f.to(torch.bfloat16))
               for t, f in zip(half.tables.values(), full.tables.values(), strict=True))
    save_checkpoint(tmp_path / "full.pt", full, "joint")
    save_checkpoint(tmp_path / "half.pt", half, "joint")
    table_bytes = 4000 * 16 * 2
    assert (tmp_path / "full.pt").stat().st_size - (tmp_path / "half.pt").stat().st_size > 0.9 * table_bytes
    other = EmbeddingCollection(specs, optimizer=LazyAdam())
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(tmp_path / "half.pt", other)
    with pytest.raises(ValueError, match="own precision"):
        other.load_state_dict(half.state_dict())
    other.set_precision(TablePrecision.BF16)
    load_checkpoint(tmp_path / "half.pt", other)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(other.tables.values(), half.tables.values(), strict=True))


def test_from_torch_with_precision_computes_on_the_rounded_weights() -> None:
    from torch import nn

    from moefast.config import TablePrecision
    from moefast.nn import EmbeddingCollection

    module = nn.EmbeddingBag(20, 4, mode="sum", padding_idx=0)
    collection = EmbeddingCollection.from_torch({"x": module}, precision=TablePrecision.FP16)
    ids = torch.randint(0, 20, (6, 3))
    expected = nn.functional.embedding_bag(ids, module.weight.detach().half().float(), mode="sum", padding_idx=0)
    torch.testing.assert_close(collection({"x": ids}), expected, rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_run_with_half_tables_records_them_and_resumes_bitwise(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, one_thread: None, precision: str
) -> None:
    """``table_precision`` is recorded in settings.json and metrics.json, the checkpoints hold
    the tables in it, a resume with another value is refused by name, and a run stopped mid-epoch
    and resumed ends bitwise where the uninterrupted one does (the rounding bits come from a
    counter-based hash: nothing about them enters the snapshot)."""
    import json

    import _resume_run as tiny
    from test_resume import assert_same_run

    from moefast.config import TablePrecision
    from moefast.runs.checkpoint import read_checkpoint

    whole, cut = tiny.cut_and_resume(tmp_path, monkeypatch, "table_precision",
                                     table_precision=TablePrecision(precision), max_epochs=2)
    assert json.loads((whole / "metrics.json").read_text())["table_precision"] == precision
    assert json.loads((whole / "settings.json").read_text())["train"]["table_precision"] == precision
    state = read_checkpoint(next((whole / "checkpoints").glob("*.pt")))["state_dict"]
    tables = [t for name, t in state.items() if ".tables." in name]
    assert tables and all(t.dtype == TablePrecision(precision).dtype for t in tables)
    assert_same_run(cut, whole)


@needs_ext
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_a_half_update_is_the_float32_update_rounded_once(dtype: torch.dtype, config: FusedOptimizer) -> None:
    """From the same (half-representable) weights and gradients, the engine's half-table update
    keeps the float32 optimizer state bit for bit and lands on one of the two half values that
    bracket its float32 table's update: nothing but the final rounding differs (a half path
    with another formula, a learning rate or a bias correction of its own, fails here). The
    engine only: the reference's float32 row-wise Adagrad is the specification, summing the
    squares in torch's order, not the engine's (the half reference equals the engine bitwise,
    tested above)."""
    backend = "fast"
    g = torch.Generator().manual_seed(3)
    start = (torch.randn(200, 16, generator=g) * 0.05).to(dtype)
    rows = torch.arange(0, 200, 2)
    grads = torch.randn(rows.numel(), 16, generator=g) * 0.01
    results = []
    for table in (start.float(), start.clone()):
        weight = table.clone().requires_grad_()
        state = config.init_state(weight)
        _single_id_update(weight, state, rows, grads, config, backend)
        results.append((weight.detach(), state))
    (full, full_state), (half, half_state) = results
    for slot, value in full_state.items():
        assert torch.equal(half_state[slot], value), slot
    assert not torch.equal(half.float(), start.float())
    exact = full[rows]
    got = half[rows].float()
    down = exact.to(dtype).float()  # round to nearest, then the neighbour on the other side
    up = torch.nextafter(exact.to(dtype), torch.where(exact > down, torch.inf, -torch.inf).to(dtype)).float()
    assert bool(((got == down) | (got == up) | (got == exact)).all())
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(_bits(half[untouched]), _bits(start[untouched]))
