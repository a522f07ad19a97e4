"""``moefast reproduce``: the method's claims, tested on synthetic data that mirrors the paper's.

The paper (MoE-MLoRA) claims three things: a gain on large, diverse domain sets (+1.45 WAUC
points on Taobao-20), little gain on low-diversity ones (MovieLens), and that more experts per
domain is not always better. This module runs the experiments that test them and writes the
report (``claims.md``, ``claims.png``, the raw ``claims-runs.csv``), stating claim by claim
whether the evidence here supports it.

One **run** is a data setting (synthetic preset, number of domains, diversity), a method
variant (base, MLoRA, MoE-MLoRA with each gate start, the seeds' as-run mode), a batch
protocol (single-domain batches, the seeds', or mixed batches) and a seed. The seed draws
everything: the dataset, the initial weights, the batch order and dropout. Two variants on the
same seed therefore see the same data, which makes a **pair**; a comparison holds the protocol
fixed on both sides, and its interval is a t-interval over the per-seed paired differences.

Sections, in the order they run (a budget stops the plan part-way; the report says what ran):

1. ``core``: Taobao-like, 20 domains, every variant, both protocols.
2. ``domains``: Taobao-like with 10 and 30 domains.
3. ``diversity``: Taobao-like, 20 domains, diversity 0.2 and 0.5 (0.8 is the core).
4. ``movielens``: MovieLens-like (learned tables, diversity 0.2), 2, 7 and 21 domains.
5. ``experts``: Taobao-like, 10 domains, MoE-MLoRA with 2, 3 and 4 experts per domain.

**Real data.** With ``taobao_dir`` (the raw Taobao files, with the shipped user and item
vectors) and ``movielens_dir`` (MovieLens-1M's ``.dat`` files), the Taobao-like settings become
Taobao-N (N = the number of domains, the first N themes) and the MovieLens-like ones MovieLens-1M
split by gender (2), age (7) or occupation (21); the diversity sweep has no real counterpart
and is skipped. A seed then draws the model, batch order and dropout only (the data is fixed),
and there is no oracle.

Every finished run is appended to the CSV at once (written whole to a temporary file, then
renamed), keyed by every option that varies; a rerun skips the keys already there, so the plan
resumes across sessions. Runs within a section go seed by seed, so a partial section holds
complete pairs.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moefast.config import BatchMode, GateInit, PretrainedMode, TowerConfig, TowerKind, TrainConfig
from moefast.data.dataset import MultiDomainDataset

__all__ = [
    "SECTIONS",
    "VARIANTS",
    "ClaimsConfig",
    "Run",
    "Setting",
    "Variant",
    "paired",
    "plan_runs",
    "run_claims",
    "t_interval",
    "write_report",
]


# MovieLens-1M's domain columns by their number of domains.
MOVIELENS_DOMAINS = {2: "gender", 7: "age", 21: "occupation"}


@dataclass(frozen=True)
class Setting:
    """A data setting: a synthetic preset (``taobao`` or ``movielens``) with its number of
    domains and diversity, or (``source="real"``) the real dataset the preset mirrors."""

    preset: str
    num_domains: int
    diversity: float
    source: str = "synthetic"

    @property
    def label(self) -> str:
        if self.source == "real":
            if self.preset == "taobao":
                return f"Taobao-{self.num_domains} (real)"
            return f"MovieLens-1M by {MOVIELENS_DOMAINS.get(self.num_domains, '?')} (real, D={self.num_domains})"
        return f"{self.preset}, D={self.num_domains}, diversity {self.diversity:g}"


@dataclass(frozen=True)
class Variant:
    """A method as the claims compare it.

    ``gate_init`` is ``None`` for base and MLoRA (no gate); ``seeds_compat`` is the seeds'
    as-run mode (random gate, backbone trainable in every stage, single-domain batches only).
    """

    name: str
    kind: TowerKind
    gate_init: GateInit | None = None
    seeds_compat: bool = False
    experts_per_domain: int = 1

    def with_experts(self, k: int) -> Variant:
        return replace(self, name=f"{self.name}-k{k}", experts_per_domain=k)


BASE = Variant("base", TowerKind.BASE)
MLORA = Variant("mlora", TowerKind.MLORA)
MOE_SPECIALIST = Variant("moe-specialist", TowerKind.MOE_MLORA, GateInit.SPECIALIST)
MOE_RANDOM = Variant("moe-random", TowerKind.MOE_MLORA, GateInit.RANDOM)
MOE_SEEDS = Variant("moe-seeds-compat", TowerKind.MOE_MLORA, GateInit.RANDOM, seeds_compat=True)
VARIANTS = (BASE, MLORA, MOE_SPECIALIST, MOE_RANDOM, MOE_SEEDS)
PROTOCOLS = (BatchMode.SINGLE_DOMAIN, BatchMode.MIXED)


@dataclass(frozen=True)
class Run:
    setting: Setting
    variant: Variant
    protocol: BatchMode
    seed: int
    section: str

    def key(self, rows: int, model: str) -> tuple[str, ...]:
        """Every option that varies between runs (the CSV's key columns, as strings)."""
        v = self.variant
        pretrained = "frozen" if self.setting.preset == "taobao" else "none"
        return (
            self.setting.source, self.setting.preset, str(self.setting.num_domains), f"{self.setting.diversity:g}", str(rows), model,
            v.kind.value, v.gate_init.value if v.gate_init else "", str(v.experts_per_domain),
            str(v.seeds_compat).lower(), self.protocol.value, pretrained, str(self.seed),
        )


KEY_COLUMNS = ("source", "preset", "num_domains", "diversity", "rows", "model", "method", "gate_init",
               "experts_per_domain", "seeds_compat", "batch_mode", "pretrained", "seed")
VALUE_COLUMNS = ("variant", "section", "wauc", "mean_auc", "logloss", "oracle_wauc", "params",
                 "adapter_params", "seconds")


def _section_runs(name: str, seeds: Sequence[int], real: bool = False) -> list[Run]:
    taobao = "taobao"
    groups: list[tuple[Setting, Sequence[Variant], Sequence[BatchMode]]] = []
    common = (BASE, MLORA, MOE_SPECIALIST, MOE_RANDOM)
    if name == "core":
        groups.append((Setting(taobao, 20, 0.8), VARIANTS, PROTOCOLS))
    elif name == "domains":
        groups += [(Setting(taobao, d, 0.8), common, PROTOCOLS) for d in (10, 30)]
    elif name == "diversity":
        groups += [(Setting(taobao, 20, div), common, PROTOCOLS) for div in (0.2, 0.5)]
    elif name == "movielens":
        groups += [(Setting("movielens", d, 0.2), common, PROTOCOLS) for d in (2, 7, 21)]
    elif name == "experts":
        moe = [v.with_experts(k) for k in (2, 3, 4) for v in (MOE_SPECIALIST, MOE_RANDOM)]
        groups.append((Setting(taobao, 10, 0.8), moe, PROTOCOLS))
    else:
        raise ValueError(f"unknown claims section {name!r}; choose from {', '.join(SECTIONS)}")
    if real:  # the real datasets the presets mirror; diversity is no knob there
        groups = [(replace(s, source="real"), v, p) for s, v, p in groups if name != "diversity"]
    runs = []
    for setting, variants, protocols in groups:
        for seed in seeds:
            for protocol in protocols:
                for variant in variants:
                    if variant.seeds_compat and protocol is not BatchMode.SINGLE_DOMAIN:
                        continue  # the seeds' as-run mode is single-domain batches by definition
                    runs.append(Run(setting, variant, protocol, seed, name))
    return runs


SECTIONS = ("core", "domains", "diversity", "movielens", "experts")


@dataclass(frozen=True)
class ClaimsConfig:
    """The claims plan.

    Args:
        sections: which sections, in :data:`SECTIONS` order.
        seeds: one run per seed and variant (at least 5 for the report's intervals).
        rows: rows of every synthetic dataset (the presets' 200,000 unless set).
        model: the backbone (DeepFM, the paper's headline backbone).
        out: the folder of ``claims.md``, ``claims.png`` and ``claims-runs.csv``.
        budget_hours: no new run starts once this much wall time has passed (``None``: no limit;
            the first run always starts).
        max_epochs: the epoch cap of every stage (the library's default unless set).
        backend: ``reference`` | ``fast`` | ``auto`` (``None``: ``MOEFAST_BACKEND``, then auto).
        taobao_dir, movielens_dir: the raw files of the real datasets (see the module
            docstring); setting either runs the plan on real data (both are needed for every
            section to run; a section whose dataset is not given is refused).
        cache_dir: where the real datasets' processed forms are cached.
        variants: run only these variants (names as in :data:`VARIANTS`, ``-k<k>`` included);
            ``None`` runs every variant of the plan.
    """

    sections: tuple[str, ...] = SECTIONS
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    rows: int | None = None
    model: str = "deepfm"
    out: str = "docs/results"
    budget_hours: float | None = None
    max_epochs: int | None = None
    backend: str | None = None
    taobao_dir: str | None = None
    movielens_dir: str | None = None
    cache_dir: str | None = None
    variants: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.variants is not None:
            moe = [v for v in VARIANTS if v.kind is TowerKind.MOE_MLORA and not v.seeds_compat]
            known = {v.name for v in VARIANTS} | {f"{v.name}-k{k}" for v in moe for k in (2, 3, 4)}
            unknown = sorted(set(self.variants) - known)
            if unknown or not self.variants:
                raise ValueError(f"claims variants {list(self.variants)!r}: choose from {', '.join(v.name for v in VARIANTS)}"
                                 " (with -k2, -k3, -k4 for MoE-MLoRA)")
        if self.real:
            for section in self.sections:
                need = "movielens_dir" if section == "movielens" else "taobao_dir"
                if section != "diversity" and getattr(self, need) is None:
                    raise ValueError(f"claims section {section!r} on real data needs {need}")
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"claims sections {list(self.sections)!r}: choose from {', '.join(SECTIONS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"claims seeds must be distinct and not empty, got {self.seeds!r}")
        if self.budget_hours is not None and not self.budget_hours > 0:
            raise ValueError(f"budget_hours must be > 0, got {self.budget_hours!r}")
        if self.rows is not None and self.rows < 100:
            raise ValueError(f"rows must be >= 100, got {self.rows!r}")
        if self.rows is not None and self.real:
            raise ValueError("rows applies to the synthetic presets, not to real data (which is used whole)")
        object.__setattr__(self, "model", self.model.lower())

    def settings(self) -> dict[str, Any]:
        """What every run of one CSV must share beyond its key: the training and tower options
        the plan does not vary (recorded in ``claims-settings.json`` by the first run)."""
        from moefast.train.rundir import to_jsonable

        train = to_jsonable(self.train_config(seed=0, protocol=BatchMode.MIXED, seeds_compat=False))
        for varied in ("seed", "batch_mode", "seeds_compat", "progress"):
            train.pop(varied, None)
        tower = to_jsonable(TowerConfig())
        for varied in ("kind", "gate_init", "experts_per_domain"):
            tower.pop(varied, None)
        return {"train": train, "tower": tower, "backend": self.backend or "auto"}

    def train_config(self, *, seed: int, protocol: BatchMode, seeds_compat: bool) -> TrainConfig:
        """The training options of one run."""
        train = TrainConfig(seed=seed, batch_mode=protocol, seeds_compat=seeds_compat, progress=False,
                            pretrained=PretrainedMode.FROZEN)
        return train if self.max_epochs is None else replace(train, max_epochs=self.max_epochs)

    @property
    def real(self) -> bool:
        return self.taobao_dir is not None or self.movielens_dir is not None

    @property
    def csv_path(self) -> Path:
        return Path(self.out) / "claims-runs.csv"

    def rows_of(self, setting: Setting) -> int:
        from moefast.data.synthetic import PRESETS

        if setting.source == "real":
            return 0  # all of the dataset
        return self.rows if self.rows is not None else PRESETS[setting.preset].rows


def plan_runs(config: ClaimsConfig) -> list[Run]:
    """Every run of the plan, section by section (in :data:`SECTIONS` order), seed by seed."""
    return [run for name in SECTIONS if name in config.sections
            for run in _section_runs(name, config.seeds, config.real)
            if config.variants is None or run.variant.name in config.variants]


def _load(setting: Setting, seed: int, rows: int, config: ClaimsConfig) -> tuple[MultiDomainDataset, float]:
    """The setting's dataset drawn with ``seed`` and the oracle test WAUC of its true logits
    (real data: the dataset, the same for every seed, and NaN)."""
    from moefast import data
    from moefast.data import synthetic
    from moefast.train.metrics import evaluate_scores

    if setting.source == "real":
        if setting.preset == "taobao":
            dataset = data.load("taobao", raw_dir=config.taobao_dir, num_themes=setting.num_domains,
                                cache_dir=config.cache_dir)
            if not dataset.pretrained:
                raise ValueError(f"{config.taobao_dir}: the claims' Taobao setting needs the shipped user and "
                                 "item vectors (user_embedding.csv, item_embedding.csv)")
            return dataset, math.nan
        return data.load("movielens-1m", raw_dir=config.movielens_dir,
                         domain=MOVIELENS_DOMAINS[setting.num_domains], cache_dir=config.cache_dir), math.nan

    cfg = synthetic.preset(setting.preset, seed=seed, rows=rows, num_domains=setting.num_domains,
                           diversity=setting.diversity)
    dataset = synthetic.generate(cfg)
    test = dataset.test
    logits = synthetic.ground_truth(cfg).logits(test.features, test.domain)
    oracle = evaluate_scores(torch.from_numpy(logits).float(), test.label, test.domain, dataset.domain_names)
    return dataset, oracle.wauc


def train_run(run: Run, dataset: MultiDomainDataset, config: ClaimsConfig) -> dict[str, Any]:
    """Train one run on its dataset; the CSV row's values (but the oracle)."""
    from moefast import models
    from moefast.train.loop import fit

    v = run.variant
    tower = TowerConfig(gate_init=v.gate_init or GateInit.RANDOM)
    model = models.build(config.model, dataset, v.kind, experts_per_domain=v.experts_per_domain,
                         tower_config=tower, seed=run.seed)
    train = config.train_config(seed=run.seed, protocol=run.protocol, seeds_compat=v.seeds_compat)
    start = time.perf_counter()
    result = fit(model, dataset, train, backend=config.backend)
    seconds = time.perf_counter() - start
    test = result.metrics["test"]
    adapters = [*model.tower.adapter_parameters(), *model.tower.gate_parameters()]
    return {
        "variant": v.name, "section": run.section,
        "wauc": test["wauc"], "mean_auc": test["mean_auc"], "logloss": test["logloss"],
        "params": sum(p.numel() for p in model.parameters()),
        "adapter_params": sum(p.numel() for p in adapters), "seconds": round(seconds, 2),
    }


def _read_csv(path: Path) -> Any:
    import pandas as pd

    if not path.exists():
        return pd.DataFrame(columns=[*KEY_COLUMNS, *VALUE_COLUMNS])
    frame = pd.read_csv(path, dtype={c: str for c in KEY_COLUMNS})
    if "source" not in frame:  # written before real data could be run
        frame.insert(0, "source", "synthetic")
    keys = [c for c in KEY_COLUMNS if c in frame]
    frame[keys] = frame[keys].fillna("")  # an empty key (no gate) is "", a missing metric stays NaN
    return frame


def _append_row(path: Path, row: dict[str, Any]) -> Any:
    """Add one finished run to the CSV and return the whole table.

    Under an exclusive lock, the file is read again, the row added (unless a concurrent worker
    already wrote its key) and the table written to a temporary file that replaces the CSV: two
    ``moefast reproduce`` processes on different sections can share one CSV, and a kill never
    leaves a half-written file."""
    import fcntl

    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        frame = _read_csv(path)
        keys = {tuple(r) for r in frame[list(KEY_COLUMNS)].itertuples(index=False)}
        if tuple(row[c] for c in KEY_COLUMNS) not in keys:
            frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    return frame


def run_claims(config: ClaimsConfig, *, say: Callable[[str], None] = lambda _msg: None) -> dict[str, Path]:
    """Run every run of the plan not yet in the CSV (within the budget), then write the report.

    Concurrent workers may share the CSV when they run different sections (``sections``).
    Returns the paths of ``claims-runs.csv``, ``claims.md`` and ``claims.png``.
    """

    csv = config.csv_path
    _check_settings(config)
    frame = _read_csv(csv)
    done = {tuple(row) for row in frame[list(KEY_COLUMNS)].itertuples(index=False)}
    runs = plan_runs(config)
    todo = [r for r in runs if r.key(config.rows_of(r.setting), config.model) not in done]
    say(f"claims: {len(runs)} runs planned, {len(runs) - len(todo)} in {csv}, {len(todo)} to run")
    start = time.perf_counter()
    loaded: tuple[tuple[Setting, int], MultiDomainDataset, float] | None = None
    for number, run in enumerate(todo, 1):
        if number > 1 and config.budget_hours is not None and time.perf_counter() - start >= 3600 * config.budget_hours:
            say(f"claims: budget of {config.budget_hours:g} h spent; {len(todo) - number + 1} runs left "
                "(rerun the same command to continue)")
            break
        rows = config.rows_of(run.setting)
        if loaded is None or loaded[0] != (run.setting, run.seed):
            dataset, oracle = _load(run.setting, run.seed, rows, config)
            loaded = ((run.setting, run.seed), dataset, oracle)
        _, dataset, oracle = loaded
        say(f"[{number}/{len(todo)}] {run.section}: {run.setting.label}, {run.variant.name}, "
            f"{run.protocol.value}, seed {run.seed}")
        values = train_run(run, dataset, config)
        values["oracle_wauc"] = oracle
        row = dict(zip(KEY_COLUMNS, run.key(rows, config.model), strict=True)) | values
        _append_row(csv, row)
    return write_report(config)


def _check_settings(config: ClaimsConfig) -> None:
    """Refuse to add runs to a CSV recorded with other fixed settings (``--max-epochs``, the
    backend, the library's training or tower defaults): their results would be mixed."""
    from moefast.train.rundir import check_settings

    path = config.csv_path.with_name("claims-settings.json")
    check_settings(path, config.settings(), lambda keys: (
        f"{config.csv_path} holds runs made with other settings ({', '.join(keys)}; recorded in {path}): "
        "use another --out or the same settings"))


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def t_interval(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and half-width of the 95% t-interval of ``values`` (NaN half-width below 2 values);
    NaN values are dropped. Returns ``(mean, half_width, n)``."""
    kept = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = int(kept.size)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(kept[0]), math.nan, 1
    df = n - 1
    # Beyond the table, the Cornish-Fisher expansion z + (z^3 + z) / (4 df) (error < 1e-3).
    quantile = _T975[df - 1] if df <= len(_T975) else 1.95996 + (1.95996**3 + 1.95996) / (4 * df)
    return float(kept.mean()), quantile * float(kept.std(ddof=1)) / math.sqrt(n), n


def paired(frame: Any, setting: Setting, protocol: str, left: str, right: str) -> tuple[float, float, int]:
    """The t-interval of ``WAUC(left) - WAUC(right)`` over the seeds both ran (same setting,
    same protocol): ``(mean, half_width, pairs)``."""
    block = _block(frame, setting)
    block = block[block["batch_mode"] == protocol]
    a = block[block["variant"] == left].set_index("seed")["wauc"]
    b = block[block["variant"] == right].set_index("seed")["wauc"]
    common = sorted(set(a.index) & set(b.index))
    return t_interval([float(a[s]) - float(b[s]) for s in common])


def _block(frame: Any, setting: Setting) -> Any:
    return frame[(frame["source"] == setting.source) & (frame["preset"] == setting.preset) & (frame["num_domains"] == str(setting.num_domains))
                 & (frame["diversity"] == f"{setting.diversity:g}")]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _points(mean: float, half: float, n: int, *, signed: bool = False) -> str:
    """WAUC (or a difference of WAUCs) in points (x 100) with its 95% interval."""
    if n == 0 or math.isnan(mean):
        return "-"
    value = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
    return value + ("" if math.isnan(half) else f" ± {100 * half:.2f}") + f" (n={n})"


def _settings(frame: Any) -> list[Setting]:
    keys = frame[["source", "preset", "num_domains", "diversity"]].drop_duplicates().itertuples(index=False)
    return [Setting(p, int(d), float(v), source) for source, p, d, v in keys]


def _order(variants: Iterable[str]) -> list[str]:
    rank = {v.name: i for i, v in enumerate(VARIANTS)}
    return sorted(set(variants), key=lambda v: (rank.get(v, len(rank)), v))


def _setting_table(frame: Any, setting: Setting) -> list[str]:
    block = _block(frame, setting)
    lines = [f"### {setting.label}", ""]
    if setting.source == "synthetic":
        oracle = t_interval(block.drop_duplicates("seed")["oracle_wauc"].astype(float))
        lines.append(f"Oracle test WAUC (the generator's true logits): {_points(*oracle)}. Rows per dataset: "
                     f"{', '.join(sorted(set(block['rows'])))}.")
    lines += ["", "| variant | params (adapters + gate) | seconds | WAUC, single-domain | WAUC, mixed |",
              "|---|---:|---:|---:|---:|"]
    for variant in _order(block["variant"]):
        rows = block[block["variant"] == variant]
        cells = []
        for protocol in (p.value for p in PROTOCOLS):
            cells.append(_points(*t_interval(rows[rows["batch_mode"] == protocol]["wauc"].astype(float))))
        params = f"{int(rows['params'].astype(float).iloc[0]):,} ({int(rows['adapter_params'].astype(float).iloc[0]):,})"
        seconds = f"{rows['seconds'].astype(float).mean():.0f}"
        lines.append(f"| {variant} | {params} | {seconds} | " + " | ".join(cells) + " |")
    pairs = _pair_rows(frame, setting)
    if pairs:
        lines += ["", "Paired differences (same seed, same data, same protocol), WAUC points:", "",
                  "| comparison | single-domain | mixed |", "|---|---:|---:|"]
        lines += pairs
    return [*lines, ""]


def _comparisons(variants: Iterable[str]) -> list[tuple[str, str]]:
    present = set(variants)
    out: list[tuple[str, str]] = []
    for moe in _order(v for v in present if v.startswith("moe-")):
        for other in ("mlora", "base"):
            if other in present:
                out.append((moe, other))
    if "mlora" in present and "base" in present:
        out.append(("mlora", "base"))
    if "moe-specialist" in present and "moe-random" in present:
        out.append(("moe-specialist", "moe-random"))
    return out


def _pair_rows(frame: Any, setting: Setting) -> list[str]:
    block = _block(frame, setting)
    lines = []
    for left, right in _comparisons(block["variant"]):
        cells = [_points(*paired(frame, setting, p.value, left, right), signed=True) for p in PROTOCOLS]
        if any(c != "-" for c in cells):
            lines.append(f"| {left} − {right} | " + " | ".join(cells) + " |")
    return lines


# A comparison with fewer seeds than this is reported as preliminary (the plan runs 5).
MIN_SEEDS = 5


def _verdict(mean: float, half: float, n: int) -> str:
    """The reading of one paired interval: supported, contradicted or inconclusive."""
    if n < 2 or math.isnan(half):
        return "not enough runs to judge"
    if mean - half > 0:
        word = "supported (the interval lies above 0)"
    elif mean + half < 0:
        word = "contradicted (the interval lies below 0)"
    else:
        word = "inconclusive (the interval contains 0)"
    return word if n >= MIN_SEEDS else f"preliminary, {n} seeds: {word}"


def _per_seed(frame: Any, setting: Setting, protocol: str, variant: str) -> dict[str, float]:
    block = _block(frame, setting)
    rows = block[(block["batch_mode"] == protocol) & (block["variant"] == variant)]
    return {str(seed): float(w) for seed, w in zip(rows["seed"], rows["wauc"], strict=True)}


def _best_baseline(frame: Any, setting: Setting, protocol: str) -> str | None:
    """``base`` or ``mlora``, whichever has the higher mean WAUC (the paper's "best baseline")."""
    means = {b: t_interval(_per_seed(frame, setting, protocol, b).values())[0] for b in ("base", "mlora")}
    present = {b: m for b, m in means.items() if not math.isnan(m)}
    return max(present, key=lambda b: present[b]) if present else None


def _gain(frame: Any, setting: Setting, protocol: str, moe: str) -> dict[str, float]:
    """Per seed: WAUC of ``moe`` minus WAUC of the best baseline (chosen by mean, same protocol)."""
    best = _best_baseline(frame, setting, protocol)
    if best is None:
        return {}
    a, b = _per_seed(frame, setting, protocol, moe), _per_seed(frame, setting, protocol, best)
    return {seed: a[seed] - b[seed] for seed in sorted(set(a) & set(b))}


def _claims(frame: Any, source: str) -> list[str]:
    """Claim by claim, what the runs on ``source`` data say (only what was run).

    Each verdict reads a 95% t-interval over per-seed paired differences; with several lines per
    claim (protocols, gate starts), each is one comparison at 95%, not a joint statement.
    """
    single = BatchMode.SINGLE_DOMAIN.value
    mixed = BatchMode.MIXED.value
    mine = [s for s in _settings(frame) if s.source == source]
    core = Setting("taobao", 20, 0.8, source)
    lines = [f"## The claims, one by one ({source} data)", "",
             "Each line is one comparison: a 95% t-interval over per-seed paired differences, in WAUC "
             f"points. Fewer than {MIN_SEEDS} seeds is marked preliminary.", ""]
    lines.append("1. **MoE-MLoRA gains on large, diverse domain sets.** The paper: +1.45 WAUC points on "
                 "Taobao-20 over the best baseline. Here: MoE-MLoRA minus the best of base and MLoRA "
                 "(by mean WAUC, same protocol) on the Taobao-like setting with 20 domains.")
    if _block(frame, core).empty:
        lines.append("   - Not run yet.")
    for protocol in (single, mixed):
        best = _best_baseline(frame, core, protocol)
        for moe in ("moe-specialist", "moe-random", "moe-seeds-compat"):
            gain = t_interval(_gain(frame, core, protocol, moe).values())
            if gain[2]:
                lines.append(f"   - {protocol} batches, {moe} − {best}: {_points(*gain, signed=True)}: "
                             f"{_verdict(*gain)}.")
    lines += ["", "2. **Little gain on low-diversity data.** Judged one factor at a time on the Taobao-like "
              "diversity sweep (20 domains): the gain of claim 1 (MoE-MLoRA, specialist gate, minus the "
              "best baseline) at the highest diversity minus the gain at the lowest, paired by seed; the "
              "claim is supported when that difference is above 0. The MovieLens-like settings (learned "
              "tables, diversity 0.2) show the gain where the paper reports little."]
    sweep = sorted((s for s in mine if s.preset == "taobao" and s.num_domains == 20), key=lambda s: s.diversity)
    for protocol in (single, mixed):
        gains = {s.diversity: _gain(frame, s, protocol, "moe-specialist") for s in sweep}
        cells = [f"diversity {d:g}: {_points(*t_interval(g.values()), signed=True)}" for d, g in gains.items()]
        if cells:
            lines.append(f"   - {protocol} batches, gain by diversity: " + "; ".join(cells))
        if len(sweep) >= 2:
            high, low = gains[sweep[-1].diversity], gains[sweep[0].diversity]
            diff = t_interval([high[k] - low[k] for k in sorted(set(high) & set(low))])
            lines.append(f"     - gain at {sweep[-1].diversity:g} minus gain at {sweep[0].diversity:g}: "
                         f"{_points(*diff, signed=True)}: {_verdict(*diff)}.")
    if len(sweep) < 2:
        lines.append("   - The diversity sweep has not run yet: the claim is not judged.")
    for setting in sorted((s for s in mine if s.preset == "movielens"), key=lambda s: s.num_domains):
        cells = [f"{p}: {_points(*t_interval(_gain(frame, setting, p, 'moe-specialist').values()), signed=True)}"
                 for p in (single, mixed)]
        lines.append(f"   - {setting.label}, gain over the best baseline: " + "; ".join(cells))
    lines += ["", "3. **More experts per domain is not always better** (Taobao-like, 10 domains). Supported "
              "when adding experts (k to k + 1, paired by seed) makes MoE-MLoRA significantly worse at "
              "some step; contradicted when every step makes it significantly better."]
    ten = Setting("taobao", 10, 0.8, source)
    before = len(lines)
    for base_variant in ("moe-specialist", "moe-random"):
        for protocol in (single, mixed):
            names = [base_variant if k == 1 else f"{base_variant}-k{k}" for k in (1, 2, 3, 4)]
            by_k = [_per_seed(frame, ten, protocol, name) for name in names]
            if sum(1 for d in by_k if d) < 2:
                continue
            means = "; ".join(f"k={k + 1}: {_points(*t_interval(d.values()))}" for k, d in enumerate(by_k))
            steps = [t_interval([b[s] - a[s] for s in sorted(set(a) & set(b))]) for a, b in itertools.pairwise(by_k)]
            judged = [st for st in steps if st[2] >= 2 and not math.isnan(st[1])]
            worse = any(m + h < 0 for m, h, _ in judged)
            better = len(judged) == 3 and all(m - h > 0 for m, h, _ in judged)
            few = min((st[2] for st in judged), default=0) < MIN_SEEDS
            word = ("supported (a step to more experts is significantly worse)" if worse else
                    "contradicted (every step to more experts is significantly better)" if better else
                    "inconclusive (no step is significantly worse)" if judged else "not enough runs to judge")
            if judged and few:
                word = f"preliminary: {word}"
            lines.append(f"   - {base_variant}, {protocol} batches: {means}. Steps k → k + 1: "
                         + ", ".join(_points(*st, signed=True) for st in steps) + f": {word}.")
    if len(lines) == before:
        lines.append("   - Not run yet.")
    lines += ["", "4. **The batch protocol** (not a claim of the paper; it chose moefast's default): mixed "
              "minus single-domain batches, paired by seed, per variant, on the core setting."]
    for variant in ("base", "mlora", "moe-specialist", "moe-random"):
        a, b = _per_seed(frame, core, mixed, variant), _per_seed(frame, core, single, variant)
        diff = t_interval([a[k] - b[k] for k in sorted(set(a) & set(b))])
        if diff[2]:
            lines.append(f"   - {variant}: {_points(*diff, signed=True)}: {_verdict(*diff)}.")
    return [*lines, ""]


def _relevant(frame: Any, config: ClaimsConfig) -> Any:
    """The runs of this plan's backbone and sizes (a smoke run with ``--rows`` or another
    ``--model`` into the same CSV is kept there but left out of the report)."""
    import pandas as pd

    if not len(frame):
        return frame
    expected = [str(config.rows_of(Setting(p, int(d), float(v), src)))
                for src, p, d, v in frame[["source", "preset", "num_domains", "diversity"]].itertuples(index=False)]
    keep = (frame["model"] == config.model) & (frame["rows"] == pd.Series(expected, index=frame.index))
    return frame[keep]


def write_report(config: ClaimsConfig) -> dict[str, Path]:
    """``claims.md`` and ``claims.png`` from the runs in the CSV (the runs of every section)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    frame = _relevant(_read_csv(config.csv_path), config)
    paths = {"claims-runs.csv": config.csv_path, "claims.md": out / "claims.md", "claims.png": out / "claims.png"}
    # Progress of the whole grid, whichever sections this process ran: the report covers them
    # all, but those whose data this configuration lacks (a real section without its folder).
    planned = plan_runs(config)
    plannable = list(config.sections)
    for name in SECTIONS:
        if name not in config.sections:
            try:
                planned += plan_runs(replace(config, sections=(name,)))
                plannable.append(name)
            except ValueError:
                continue
    done = {tuple(r) for r in frame[list(KEY_COLUMNS)].itertuples(index=False)} if len(frame) else set()
    per_section = {name: [0, 0] for name in SECTIONS if name in plannable}
    for run in planned:
        per_section[run.section][1] += 1
        per_section[run.section][0] += run.key(config.rows_of(run.setting), config.model) in done
    sources = sorted(set(frame["source"])) if len(frame) else []
    real = "real" in sources
    data_line = (
        "Real data was run here (the settings marked `(real)`): Taobao-N with its shipped vectors, "
        "frozen, and MovieLens-1M; a seed then draws the model and batch order only."
        if real else
        "**No real dataset was run here**: the settings are the synthetic `taobao` preset "
        "(pretrained, frozen user and item tables, like Taobao-10/20/30) and the `movielens` preset "
        "(learned tables, low diversity, like MovieLens-1M's gender, age and occupation splits); "
        "`docs/data.md` describes both and `moefast.data.synthetic` the generative model. The same "
        "report on the real files: `moefast reproduce --taobao-dir RAW_TAOBAO --movielens-dir RAW_ML1M "
        "--out DIR`."
    )
    lines = [
        "# MoE-MLoRA's claims, tested on data that mirrors the paper's",
        "",
        "Written by `moefast reproduce` (see `docs/results/README.md` for the command that continues "
        "or re-runs it). " + data_line,
        "",
        f"Backbone {config.model}; every figure is test WAUC in points (x 100): the mean over seeds with "
        "its 95% t-interval, `± half-width (n = seeds)`. A seed draws the data, the initial weights, the "
        "batch order and dropout, so a paired difference compares two variants on the same data; its "
        "interval is a t-interval over the per-seed differences. The training protocol (single-domain "
        "batches, the seeds', or mixed batches) is held fixed within each comparison.",
        "",
        "Variants: `base` (no adapters), `mlora` (one adapter per domain, trained jointly), "
        "`moe-specialist` (MoE-MLoRA, the gate started with weight 0.8 on each domain's own expert), "
        "`moe-random` (MoE-MLoRA, gate started at random), `moe-seeds-compat` (the seeds' as-run mode: "
        "random gate, backbone trainable in every stage, the best score carried across stages; "
        "single-domain batches only). `-k<k>`: k experts per domain. `seconds` is the mean wall time "
        "of one run, measured while the machine ran other jobs: read it as a rough relative cost.",
        "",
        "Progress: " + "; ".join(f"{name} {d}/{t} runs" for name, (d, t) in per_section.items()) + ".",
        "",
    ]
    if len(frame):
        for source in sources:
            lines += _claims(frame, source)
        lines += ["## Tables", ""]
        for setting in _settings(frame):
            lines += _setting_table(frame, setting)
        lines += ["![claims](claims.png)", ""]
    paths["claims.md"].write_text("\n".join(lines))
    _plot(paths["claims.png"], frame)
    return paths


def _plot(path: Path, frame: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = _settings(frame) if len(frame) else []
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.6 * max(len(settings), 2) + 2.5), squeeze=False)
    ax_w, ax_d = axes[0]
    labels = [s.label for s in settings]
    for k, protocol in enumerate(p.value for p in PROTOCOLS):
        for j, (left, right, colour) in enumerate((("moe-specialist", "mlora", "C0"),
                                                   ("moe-random", "mlora", "C1"),
                                                   ("mlora", "base", "C2"))):
            means, halves = [], []
            for setting in settings:
                mean, half, _ = paired(frame, setting, protocol, left, right)
                means.append(100 * mean)
                halves.append(0.0 if math.isnan(half) else 100 * half)
            y = [i + 0.12 * (3 * k + j) - 0.3 for i in range(len(settings))]
            ax_d.errorbar(means, y, xerr=halves, fmt="o" if k == 0 else "s", color=colour, capsize=2,
                          label=f"{left} − {right}, {protocol}")
    ax_d.axvline(0.0, color="grey", lw=0.8)
    ax_d.set_yticks(range(len(settings)), labels)
    ax_d.set_xlabel("paired WAUC difference, points (95% interval)")
    ax_d.legend(fontsize="x-small")
    for k, protocol in enumerate(p.value for p in PROTOCOLS):
        for j, variant in enumerate(_order(frame["variant"]) if len(frame) else []):
            if "-k" in variant:
                continue
            means, halves = [], []
            for setting in settings:
                block = _block(frame, setting)
                values = block[(block["variant"] == variant) & (block["batch_mode"] == protocol)]["wauc"]
                mean, half, _ = t_interval(values.astype(float))
                means.append(100 * mean)
                halves.append(0.0 if math.isnan(half) else 100 * half)
            y = [i + 0.08 * (5 * k + j) - 0.4 for i in range(len(settings))]
            ax_w.errorbar(means, y, xerr=halves, fmt="o" if k == 0 else "s", color=f"C{j}", capsize=2,
                          label=f"{variant}, {protocol}", alpha=1.0 if k == 0 else 0.6)
    ax_w.set_yticks(range(len(settings)), labels)
    ax_w.set_xlabel("test WAUC, points (95% interval)")
    ax_w.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
