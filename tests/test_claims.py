"""The claims work (issue 14): pretrained tables, the presets that mirror the paper's datasets,
the gate's start, and the ``moefast reproduce`` report."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import moefast
from moefast.cli import main
from moefast.config import (
    EmbeddingOptimizer,
    GateInit,
    PretrainedMode,
    TrainConfig,
    default_tower,
)
from moefast.data import synthetic
from moefast.data.dataset import MultiDomainDataset
from moefast.experiments.claims import paired
from moefast.experiments.stats import t_interval
from moefast.models.base import CTRModel
from moefast.nn.tower import DomainGate
from moefast.reference.embedding_optim import LazyAdam
from moefast.runs.checkpoint import load_checkpoint, read_checkpoint
from moefast.train.loop import set_embedding_optimizer

# Tiny runs: one torch thread is as fast as two, and a shared machine's busy core cannot stall it.
pytestmark = pytest.mark.usefixtures("one_thread")

FAST = moefast._ext.available()


def _taobao(**knobs: object) -> MultiDomainDataset:
    """A tiny Taobao-like dataset: pretrained uid / item tables, a learned domain table."""
    options: dict[str, object] = {"rows": 900, "num_domains": 3, "num_users": 40, "num_items": 30, "seed": 5}
    options.update(knobs)
    return synthetic.generate(synthetic.preset("taobao", **options))


def _fit(model: CTRModel, ds: MultiDomainDataset, out: Path | None = None, **train: object) -> None:
    config = TrainConfig(**{"max_epochs": 1, "batch_size": 256, "progress": False, "seed": 3, **train})
    moefast.train.fit(model, ds, config, out_dir=out)


def _tables(model: CTRModel) -> dict[str, torch.Tensor]:
    """Every pretrained field's table and first-order weight, cloned."""
    out = {f"emb.{n}": model.embedding.tables[n].detach().clone() for n in model.pretrained_fields}
    if model.linear is not None:
        out |= {f"lin.{n}": model.linear.weights.tables[n].detach().clone() for n in model.pretrained_fields}
    return out


def _checkpoint_tables(path: Path, model: CTRModel) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path)["state_dict"]  # reassembled (a stage stores what it changed)
    out = {f"emb.{n}": state[f"embedding.tables.{n}"] for n in model.pretrained_fields}
    if model.linear is not None:
        out |= {f"lin.{n}": state[f"linear.weights.tables.{n}"] for n in model.pretrained_fields}
    return out


def test_build_loads_pretrained_tables_and_zeroes_their_first_order_weights() -> None:
    ds = _taobao()
    assert sorted(ds.pretrained) == ["item", "uid"]
    model = moefast.models.build("deepfm", ds, "mlora")
    assert model.pretrained_fields == ("uid", "item")
    for name in ("uid", "item"):
        assert torch.equal(model.embedding.tables[name].detach(), ds.pretrained[name])
        assert model.linear is not None
        assert not model.linear.weights.tables[name].detach().any()  # the seeds' TF DeepCTR: zeros
    # The learned domain table keeps its random start.
    assert model.linear is not None and model.linear.weights.tables["domain"].detach().any()


@pytest.mark.parametrize("method", ["base", "mlora", "moe-mlora"])
@pytest.mark.parametrize("optimizer", list(EmbeddingOptimizer))
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_frozen_tables_stay_bitwise_unchanged_after_every_stage(
    tmp_path: Path, method: str, optimizer: EmbeddingOptimizer, backend: str
) -> None:
    if backend == "fast" and not FAST:
        pytest.skip("moefast._C is not built")
    ds = _taobao()
    model = moefast.models.build("deepfm", ds, method, backend=backend)
    start = _tables(model)
    domain_start = model.embedding.tables["domain"].detach().clone()
    _fit(model, ds, tmp_path, embedding_optimizer=optimizer)
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == {"base": 1, "mlora": 1, "moe-mlora": 2 + ds.num_domains}[method]
    for path in checkpoints:
        saved = _checkpoint_tables(path, model)
        for key, value in start.items():
            assert torch.equal(saved[key], value), f"{key} changed in {path.name}"
    for key, value in _tables(model).items():
        assert torch.equal(value, start[key]), key
    # The trainable table in the same collection (and the same fused-optimizer call) did train,
    # so the test would see a freeze that froze everything.
    assert not torch.equal(model.embedding.tables["domain"].detach(), domain_start)


@pytest.mark.parametrize("flags", [{"seeds_compat": True}, {"train_backbone_in_later_stages": True}])
def test_frozen_under_seeds_compat_and_a_trainable_backbone(tmp_path: Path, flags: dict[str, bool]) -> None:
    ds = _taobao()
    tower = default_tower(TrainConfig(**flags))
    model = moefast.models.build("deepfm", ds, "moe-mlora", tower_config=tower)
    start = _tables(model)
    domain_start = model.embedding.tables["domain"].detach().clone()
    _fit(model, ds, tmp_path, **flags)
    for path in sorted((tmp_path / "checkpoints").glob("*.pt")):
        saved = _checkpoint_tables(path, model)
        assert all(torch.equal(saved[k], v) for k, v in start.items()), path.name
    assert not torch.equal(model.embedding.tables["domain"].detach(), domain_start)


def test_frozen_after_convert_and_a_checkpoint_round_trip(tmp_path: Path) -> None:
    if not FAST:
        pytest.skip("moefast._C is not built")
    ds = _taobao()
    model = moefast.models.build("wdl", ds, "moe-mlora", backend="reference")
    start = _tables(model)
    moefast.convert(model, backend="fast")
    _fit(model, ds, tmp_path, embedding_optimizer=EmbeddingOptimizer.LAZY_ADAM)
    assert all(torch.equal(v, start[k]) for k, v in _tables(model).items())
    again = moefast.models.build("wdl", ds, "moe-mlora", seed=99)
    # The checkpoint holds the fused optimizer's state: the model must carry the same optimizer.
    set_embedding_optimizer(again, LazyAdam(lr=1e-3))
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    last = sorted((tmp_path / "checkpoints").glob("*.pt"))[-1]
    load_checkpoint(last, again, expected_stage=last.stem.split("_", 1)[1])
    assert all(torch.equal(v, start[k]) for k, v in _tables(again).items())


def test_finetune_changes_the_tables() -> None:
    ds = _taobao()
    model = moefast.models.build("deepfm", ds, "base")
    start = _tables(model)
    _fit(model, ds, pretrained=PretrainedMode.FINETUNE)
    after = _tables(model)
    assert not torch.equal(after["emb.uid"], start["emb.uid"])
    assert not torch.equal(after["lin.item"], start["lin.item"])


def test_wrong_vocabulary_dim_or_values_are_refused() -> None:
    ds = _taobao()
    model = moefast.models.build("deepfm", ds, "base")
    uid = ds.pretrained["uid"]
    with pytest.raises(ValueError, match=r"'uid' must be float32 \[40, 8\].*\[39, 8\]"):
        model.load_pretrained({"uid": uid[:-1]})
    with pytest.raises(ValueError, match=r"'uid' must be float32 \[40, 8\].*\[40, 4\]"):
        model.load_pretrained({"uid": uid[:, :4]})
    with pytest.raises(ValueError, match="'nope', which is not a feature"):
        model.load_pretrained({"nope": uid})
    bad = uid.clone()
    bad[7, 2] = math.nan
    with pytest.raises(ValueError, match="non-finite value in row 7"):
        model.load_pretrained({"uid": bad})
    with pytest.raises(ValueError, match=r"pretrained table 'item' must be float32"):
        dataclasses.replace(ds, pretrained={"item": uid})
    assert torch.equal(model.embedding.tables["uid"].detach(), uid)  # nothing was half-loaded


@pytest.mark.parametrize(("domains", "k"), [(3, 1), (7, 2), (5, 3), (20, 1)])
def test_specialist_gate_starts_on_own_experts(domains: int, k: int) -> None:
    gate = DomainGate(domains, domains * k, 4)
    gate.start_on_own_experts(0.8)
    table = gate.table().detach()
    owner = torch.arange(domains * k) % domains
    own = torch.stack([table[d, owner == d].sum() for d in range(domains)])
    assert (own >= 0.8 - 1e-5).all(), own
    with pytest.raises(ValueError, match=r"must be in \[1/D, 1\)"):
        gate.start_on_own_experts(0.9 / domains)


def test_the_gate_stage_starts_specialist_and_moves_the_gate(tmp_path: Path) -> None:
    ds = _taobao(num_domains=3)
    model = moefast.models.build("deepfm", ds, "moe-mlora", experts_per_domain=2)
    assert model.tower.config.gate_init is GateInit.SPECIALIST
    _fit(model, ds, tmp_path, max_epochs=3)
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.pt"))
    before_gate = read_checkpoint(checkpoints[-2])["state_dict"]
    start = DomainGate(3, 6, 4)
    start.load_state_dict({k.removeprefix("tower.gate."): v for k, v in before_gate.items()
                           if k.startswith("tower.gate.")})
    owner = torch.arange(6) % 3
    own_start = torch.stack([start.table().detach()[d, owner == d].sum() for d in range(3)])
    assert torch.allclose(own_start, torch.full((3,), 0.8), atol=1e-5)
    assert model.tower.gate is not None
    own_end = torch.stack([model.tower.gate.table().detach()[d, owner == d].sum() for d in range(3)])
    assert (own_end - own_start).abs().max() > 1e-3, (own_start, own_end)


def test_seeds_compat_starts_the_gate_like_keras() -> None:
    assert default_tower(TrainConfig(seeds_compat=True)).gate_init is GateInit.KERAS
    assert default_tower(TrainConfig()).gate_init is GateInit.SPECIALIST


@pytest.mark.parametrize(("domains", "dim"), [(1, 4), (2, 4), (3, 5), (7, 2), (10, 7)])
def test_specialist_gate_of_any_shape_keeps_every_parameter_trainable(domains: int, dim: int) -> None:
    gate = DomainGate(domains, 2 * domains, dim)
    gate.start_on_own_experts(0.8)
    table = gate.table()
    owner = torch.arange(2 * domains) % domains
    own = torch.stack([table[d, owner == d].sum() for d in range(domains)])
    assert torch.allclose(own, torch.full((domains,), 0.8 if domains > 1 else 1.0), atol=1e-5)
    # A loss that prefers the other domains' experts: every column of the linear layer gets a
    # gradient, the unused dims included (zero on both sides of an unused dim would freeze it
    # for good; with the embedding's random values there, the next step moves both).
    (table * (owner[None, :] != torch.arange(domains)[:, None])).sum().backward()
    if domains > 1:
        assert gate.linear.weight.grad is not None
        assert (gate.linear.weight.grad.abs().sum(dim=0) > 1e-6).all()


def test_gate_options_are_checked_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["train", "--rows", "600", "--num-domains", "3", "--max-epochs", "1", "--quiet", "--out",
            str(tmp_path / "run")]
    assert main([*tiny, "--gate-own-weight", "0.2"]) == 2  # below 1/D = 1/3
    assert "must be in [1/D, 1)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "base").exists(), "no method trained before the refusal"
    assert main([*tiny, "--gate-own-weight", "0.5", "--gate-init", "random"]) == 2
    assert "does nothing with gate_init random" in capsys.readouterr().err
    from moefast.config import RunConfig

    # An own-expert weight asks for the specialist start, also under seeds-compat.
    config = RunConfig(train=TrainConfig(seeds_compat=True), gate_own_weight=0.6)
    assert config.tower_config().gate_init is GateInit.SPECIALIST


@pytest.mark.parametrize("preset", ["taobao", "movielens"])
def test_presets_are_deterministic_by_seed(preset: str) -> None:
    def draw(seed: int) -> MultiDomainDataset:
        return synthetic.generate(synthetic.preset(preset, rows=500, seed=seed))

    a, b, c = draw(1), draw(1), draw(2)
    for name in a.train.features:
        assert torch.equal(a.train.features[name], b.train.features[name])
    assert torch.equal(a.test.label, b.test.label)
    assert a.pretrained.keys() == b.pretrained.keys()
    assert all(torch.equal(a.pretrained[n], b.pretrained[n]) for n in a.pretrained)
    assert not torch.equal(a.train.features["uid"], c.train.features["uid"])
    assert bool(a.pretrained) == (preset == "taobao")
    if a.pretrained:
        assert not torch.equal(a.pretrained["uid"], c.pretrained["uid"])


def test_pretrained_tables_change_neither_the_truth_nor_the_rows() -> None:
    with_tables = synthetic.generate(synthetic.preset("taobao", rows=500))
    without = synthetic.generate(synthetic.preset("taobao", rows=500, pretrained_noise=None))
    assert not without.pretrained
    assert torch.equal(with_tables.train.label, without.train.label)


def test_t_interval_matches_the_textbook() -> None:
    mean, half, n = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (mean, n) == (3.0, 5)
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert math.isnan(t_interval([1.0])[1])


@pytest.mark.slow  # among the slowest tests (--durations): selection only, make test runs it
def test_reproduce_runs_end_to_end_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    from moefast.experiments.claims import ROLE_BASE, ROLE_MLORA, Setting

    out = tmp_path / "claims"
    argv = ["reproduce", "--sections", "core", "--rows", "800", "--budget", "converged", "--max-steps", "2",
            "--out", str(out)]
    assert main([*argv, "--seeds", "1"]) == 0
    runs = pd.read_csv(out / "claims-runs.csv", dtype=str, keep_default_na=False)
    # (base, mlora) + 2 MoE-MLoRA starts x frozen-path dropout on / off, x 2 protocols, + the
    # seeds' as-run mode (single-domain, its own budget).
    assert len(runs) == 13
    assert set(runs["gate_init"]) == {"", "random", "specialist", "keras"}
    assert set(runs["budget"]) == {"converged", "seeds"} and set(runs["max_steps"]) == {"2"}
    assert set(runs[runs["method"] == "moe-mlora"]["frozen_path_dropout"]) >= {"on", "off"}
    assert set(runs[runs["method"] != "moe-mlora"]["frozen_path_dropout"]) == {""}
    assert set(runs["pretrained"]) == {"frozen"} and set(runs["expert_stop"]) == {"own-domain"}
    # Every stage stopped at the 2-step cap: counted per run.
    assert (runs["capped_stages"].astype(int) == runs["stages"].astype(int)).all()
    report = (out / "claims.md").read_text()
    assert "No real dataset was run here" in report and "core 13/" in report and "protocol v2" in report
    assert "; related 0/" in report  # the progress of the whole grid, not only the sections run
    assert "Budget ablation" in report and "[cap:" in report
    assert (out / "claims.png").stat().st_size > 0
    frame = pd.read_csv(out / "claims-runs.csv", dtype=str, keep_default_na=False)
    frame["wauc"] = frame["wauc"].astype(float)
    cell = {"batch_mode": "mixed", "budget": "converged"}
    mean, _, pairs = paired(frame, Setting("taobao", 20, 0.8), (ROLE_MLORA, cell), (ROLE_BASE, cell))
    wauc = frame[frame["batch_mode"] == "mixed"].set_index("variant")["wauc"]
    assert pairs == 1 and mean == pytest.approx(wauc["mlora"] - wauc["base"])
    capsys.readouterr()
    # Resumed with a second seed and a budget already spent: the finished runs are skipped, the
    # first new run starts, then the budget stops the plan.
    assert main([*argv, "--seeds", "1,2", "--budget-hours", "1e-9"]) == 0
    assert "26 runs planned, 13 in" in capsys.readouterr().err
    assert len(pd.read_csv(out / "claims-runs.csv")) == 14


def test_a_v1_table_is_refused_not_mixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "claims"
    out.mkdir()
    (out / "claims-runs.csv").write_text("source,preset,num_domains,seed,wauc\nsynthetic,taobao,20,1,0.7\n")
    assert main(["reproduce", "--sections", "core", "--rows", "800", "--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "claims-runs.csv holds claims runs of format 1" in err


def _taobao_raw(root: Path, themes: int = 20) -> Path:
    """A tiny raw Taobao folder in the loader's format: clicks of 30 users on 60 items over
    ``themes`` themes, with 4-d user and item vectors."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir()
    lines = ["user_id,item_id,theme_id,reach_time"]
    for t in range(themes):
        for _ in range(12):
            lines.append(f"{rng.integers(30)},{3 * t + rng.integers(3)},{100 + t},2018-09-01 12:00:00")
    (root / "theme_click_log.csv").write_text("\n".join(lines) + "\n")
    for name, count in (("user", 30), ("item", 3 * themes)):
        rows = [f"{i}," + ",".join(f"{v:.3f}" for v in rng.normal(size=4)) for i in range(count)]
        (root / f"{name}_embedding.csv").write_text(f"{name}_id,e0,e1,e2,e3\n" + "\n".join(rows) + "\n")
    return root


def test_reproduce_on_real_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    raw = _taobao_raw(tmp_path / "taobao")
    out = tmp_path / "claims"
    common = ["reproduce", "--taobao-dir", str(raw), "--cache-dir", str(tmp_path / "cache"), "--seeds", "1",
              "--budget", "converged", "--max-steps", "2", "--out", str(out), "-q", "--variants", "base,mlora"]
    assert main([*common, "--sections", "core"]) == 0
    runs = pd.read_csv(out / "claims-runs.csv", dtype=str, keep_default_na=False)
    assert set(runs["source"]) == {"real"} and len(runs) == 4  # 2 variants x 2 protocols
    assert set(runs["variant"]) == {"base", "mlora"}
    report = (out / "claims.md").read_text()
    assert "Taobao-20 (real)" in report and "No real dataset was run here" not in report
    capsys.readouterr()
    # The MovieLens section needs its files: one clear line, exit status 2.
    assert main([*common, "--sections", "movielens"]) == 2
    assert "needs movielens_dir" in capsys.readouterr().err


def test_a_finished_run_is_written_once(tmp_path: Path) -> None:
    from moefast.experiments.claims import KEY_COLUMNS, VALUE_COLUMNS, _append_row

    csv = tmp_path / "runs.csv"
    row = {c: "x" for c in KEY_COLUMNS} | {c: 1.0 for c in VALUE_COLUMNS}
    _append_row(csv, row)
    _append_row(csv, row)  # a second worker that finished the same run
    _append_row(csv, row | {"seed": "y"})
    assert len(_append_row(csv, row)) == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_keeps_other_sizes_and_settings_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    out = tmp_path / "claims"
    argv = ["reproduce", "--sections", "core", "--seeds", "1", "--budget", "converged", "--max-steps", "2",
            "--out", str(out), "-q", "--variants", "base,mlora"]
    assert main([*argv, "--rows", "800"]) == 0
    assert main([*argv, "--rows", "900"]) == 0  # a second size in the same CSV
    frame = pd.read_csv(out / "claims-runs.csv")
    assert sorted(set(frame["rows"])) == [800, 900]
    frame.loc[0, "wauc"] = float("nan")  # a run without a WAUC must not break the report
    frame.to_csv(out / "claims-runs.csv", index=False)
    assert main([*argv, "--rows", "900", "--report-only"]) == 0
    report = (out / "claims.md").read_text()
    assert "Rows per dataset: 900." in report and "800" not in report.split("## Tables")[1]
    capsys.readouterr()
    # Other fixed settings (here the step cap) are refused, naming the key, not mixed in.
    other_cap = [*argv[:8], "3", *argv[9:]]
    assert main([*other_cap, "--rows", "900"]) == 2
    assert "converged_max_steps" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The verdict logic, table-driven on hand-built per-seed frames
# ---------------------------------------------------------------------------------------------


def _frame(cells: dict[tuple[str, str, str, str], list[float]]) -> Any:
    """A claims table of the core setting: ``(variant, batch_mode, budget, dropout) -> WAUC per
    seed``; each variant's key columns are its role's (the display name is scrambled, so that
    the logic must find variants by role)."""
    import pandas as pd

    from moefast.experiments.claims import KEY_COLUMNS, VARIANTS

    by_name = {v.name: v for v in VARIANTS}
    rows = []
    for (name, mode, budget, dropout), values in cells.items():
        v = by_name[name]
        for seed, wauc in enumerate(values, 1):
            row = dict.fromkeys(KEY_COLUMNS, "")
            row |= {"source": "synthetic", "preset": "taobao", "num_domains": "20", "diversity": "0.8",
                    "cluster_spread": "1", "method": v.kind.value, "gate_init": v.gate_init.value if v.gate_init else "",
                    "experts_per_domain": "1", "seeds_compat": str(v.seeds_compat).lower(), "batch_mode": mode,
                    "budget": budget, "frozen_path_dropout": dropout, "seed": str(seed)}
            rows.append(row | {"variant": f"x{len(rows)}", "wauc": wauc})
    return pd.DataFrame(rows)


_NOISE = [0.001, -0.002, 0.0005, 0.0015, -0.001]


def _seeds(level: float, n: int = 5) -> list[float]:
    return [level + e for e in _NOISE[:n]]


@pytest.mark.parametrize(
    ("moe", "mlora", "base", "expected"),
    [
        (_seeds(0.75), _seeds(0.73), _seeds(0.70), "supported"),
        (_seeds(0.70), _seeds(0.73), _seeds(0.71), "contradicted"),
        ([0.73, 0.72, 0.74, 0.72, 0.73], [0.725, 0.73, 0.73, 0.725, 0.735], _seeds(0.70), "inconclusive"),
        (_seeds(0.75, 3), _seeds(0.73, 3), _seeds(0.70, 3), "preliminary, 3 seeds: supported"),
        (_seeds(0.75, 1), _seeds(0.73, 1), _seeds(0.70, 1), "not enough runs"),
    ],
    ids=["supported", "contradicted", "inconclusive", "preliminary", "one-seed"],
)
def test_claim_one_verdicts(moe: list[float], mlora: list[float], base: list[float], expected: str) -> None:
    from moefast.experiments.claims import (
        ROLE_MLORA,
        ROLE_SPECIALIST,
        Setting,
        best_baseline,
        gain,
        verdict,
    )

    frame = _frame({("moe-specialist", "mixed", "converged", "off"): moe, ("mlora", "mixed", "converged", ""): mlora,
                    ("base", "mixed", "converged", ""): base})
    core = Setting("taobao", 20, 0.8)
    cell = {"batch_mode": "mixed", "budget": "converged", "frozen_path_dropout": "off"}
    assert best_baseline(frame, core, cell) == ROLE_MLORA  # the better baseline by mean, here MLoRA
    assert verdict(*t_interval(gain(frame, core, cell, ROLE_SPECIALIST).values())).startswith(expected)


def test_the_best_baseline_and_cells_are_kept_apart() -> None:
    """Base wins when its mean is higher; runs of another budget, batch mode or dropout never
    enter a cell."""
    from moefast.experiments.claims import ROLE_BASE, ROLE_SPECIALIST, Setting, best_baseline, gain

    frame = _frame({("moe-specialist", "mixed", "converged", "off"): _seeds(0.75),
                    ("moe-specialist", "mixed", "converged", "on"): _seeds(0.10),
                    ("moe-specialist", "mixed", "cap10", "off"): _seeds(0.20),
                    ("mlora", "mixed", "converged", ""): _seeds(0.70), ("base", "mixed", "converged", ""): _seeds(0.72),
                    ("base", "single-domain", "converged", ""): _seeds(0.99)})
    core = Setting("taobao", 20, 0.8)
    cell = {"batch_mode": "mixed", "budget": "converged", "frozen_path_dropout": "off"}
    assert best_baseline(frame, core, cell) == ROLE_BASE
    assert gain(frame, core, cell, ROLE_SPECIALIST) == pytest.approx(dict.fromkeys(map(str, range(1, 6)), 0.03))


@pytest.mark.parametrize(
    ("off", "on", "expected"),
    [(_seeds(0.75), _seeds(0.73), False), (_seeds(0.73), _seeds(0.75), True),
     ([0.73, 0.72, 0.74, 0.72, 0.73], [0.725, 0.73, 0.73, 0.725, 0.735], True), (_seeds(0.75, 4), _seeds(0.73, 4), None)],
    ids=["off-wins", "on-wins", "inconclusive-keeps-on", "too-few-seeds"],
)
def test_frozen_path_dropout_rule(off: list[float], on: list[float], expected: bool | None) -> None:
    from moefast.experiments.claims import frozen_path_dropout_rule

    frame = _frame({("moe-specialist", "mixed", "converged", "off"): off,
                    ("moe-specialist", "mixed", "converged", "on"): on,
                    ("moe-specialist", "single-domain", "converged", "off"): _seeds(0.9)})  # never read
    assert frozen_path_dropout_rule(frame) is expected


_FLAT = [[0.750, 0.748, 0.752, 0.749, 0.751], [0.751, 0.750, 0.748, 0.752, 0.749],
         [0.749, 0.751, 0.750, 0.748, 0.752], [0.752, 0.749, 0.751, 0.750, 0.748]]


@pytest.mark.parametrize(
    ("by_k", "expected"),
    [([_seeds(m) for m in (0.75, 0.73, 0.74, 0.745)], "supported"),
     ([_seeds(m) for m in (0.70, 0.72, 0.74, 0.76)], "contradicted"), (_FLAT, "inconclusive")],
    ids=["a-step-worse", "every-step-better", "flat"],
)
def test_more_experts_verdicts(by_k: list[list[float]], expected: str) -> None:
    from moefast.experiments.claims import experts_verdict

    steps = [t_interval([b - a for a, b in zip(x, y, strict=True)]) for x, y in itertools.pairwise(by_k)]
    assert experts_verdict(steps).startswith(expected)
    assert experts_verdict([t_interval([b - a for a, b in zip(x[:3], y[:3], strict=True)])
                            for x, y in itertools.pairwise(by_k)]).startswith("preliminary")


def test_every_variant_with_a_frozen_path_takes_the_rule_in_every_section_after_the_core() -> None:
    """Each MoE-MLoRA run after the core gets the core's frozen-path dropout rule, whatever
    variants share its group (base and MLoRA, which have no frozen path, get none); a planner
    that let base's "none" leak into the next variant ran MoE-MLoRA with dropout on."""
    from moefast.experiments import claims

    runs = claims.plan_runs(claims.ClaimsConfig(sections=claims.SECTIONS[1:], seeds=(1,)))
    assert {r.section for r in runs} == set(claims.SECTIONS[1:])
    for run in runs:
        want = claims.RULE if run.variant.has_frozen_path else None
        assert run.protocol.frozen_path_dropout == want, (run.section, run.variant.name)
