"""The synthetic generator: presets, knobs, determinism, and the generative model's promises."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import moefast
from moefast.config import Pooling
from moefast.data import synthetic

SMALL = {"rows": 20_000, "num_users": 500, "num_items": 300, "num_domains": 5}
# The load calls name their preset: the default one is taobao (issue 25), these tests are about paper.
PAPER = {"preset": "paper", **SMALL}


def _all_rows(ds: moefast.data.MultiDomainDataset) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    splits = (ds.train, ds.val, ds.test)
    feats = {f.name: torch.cat([s.features[f.name] for s in splits]).numpy() for f in ds.features}
    return feats, torch.cat([s.domain for s in splits]).numpy(), torch.cat([s.label for s in splits]).numpy()


def test_paper_preset_defaults_match_the_demo_contract() -> None:
    cfg = synthetic.PRESETS["paper"]
    # The paper preset (issue 3's demo contract): >= 200,000 rows and >= 5 domains. The default
    # `moefast train` runs the taobao preset, at 100,000 rows since issue 24.
    assert cfg.rows >= 200_000 and cfg.num_domains >= 5
    ds = moefast.data.load("synthetic", **PAPER)
    assert [f.name for f in ds.features] == ["uid", "item", "domain"]
    assert all(f.dim == 8 and f.pooling is Pooling.NONE for f in ds.features)
    assert ds.feature("domain").vocab_size == ds.num_domains == 5
    assert len(ds.train) + len(ds.val) + len(ds.test) == SMALL["rows"]
    # The domain id is an input feature as well as the routing column.
    assert torch.equal(ds.train.features["domain"], ds.train.domain)


def test_wide_preset_has_26_fields_some_multi_valued() -> None:
    ds = moefast.data.load("synthetic", preset="wide", rows=3_000)
    assert len(ds.features) == 26
    multi = [f for f in ds.features if f.multi_valued]
    assert len(multi) == 3 and all(f.dim == 16 for f in ds.features)
    assert max(f.vocab_size for f in ds.features) >= 1_000_000
    for f in multi:
        bags = ds.train.features[f.name]
        assert bags.dim() == 2
        filled = bags > 0
        # Padding is on the right: once a bag has a 0, the rest of it is 0.
        assert torch.all(filled[:, 1:] <= filled[:, :-1])
        lengths = filled.sum(1)
        assert int(lengths.min()) == 0 and int(lengths.max()) == synthetic.PRESETS["wide"].multi_length


def test_same_seed_same_data_other_seed_other_data() -> None:
    a = moefast.data.load("synthetic", seed=7, **PAPER)
    b = moefast.data.load("synthetic", seed=7, **PAPER)
    c = moefast.data.load("synthetic", seed=8, **PAPER)
    for name in ("uid", "item", "domain"):
        assert torch.equal(a.train.features[name], b.train.features[name])
    assert torch.equal(a.test.label, b.test.label)
    assert not torch.equal(a.train.features["uid"], c.train.features["uid"])


def test_unknown_preset_and_options_are_named() -> None:
    with pytest.raises(ValueError, match="'huge'"):
        moefast.data.load("synthetic", preset="huge")
    with pytest.raises(ValueError, match="diversty"):
        moefast.data.load("synthetic", diversty=0.5)
    with pytest.raises(ValueError, match="diversity"):
        moefast.data.load("synthetic", diversity=1.5)
    with pytest.raises(ValueError, match="num_domains"):
        moefast.data.load("synthetic", num_domains=0)
    with pytest.raises(ValueError, match="'criteo'"):
        moefast.data.load("criteo")
    # NaN passes a "< 0" check, inf makes every logit infinite: both silently broke the labels.
    for knob in ("numeric_scale", "imbalance", "bias_scale", "diversity"):
        for bad in (float("nan"), float("inf"), True):
            with pytest.raises(ValueError, match=knob):
                moefast.data.load("synthetic", rows=100, numeric_fields=2, **{knob: bad})


@pytest.mark.parametrize("imbalance", [0.0, 1.5])
def test_domain_sizes_follow_the_imbalance_power_law(imbalance: float) -> None:
    ds = moefast.data.load("synthetic", imbalance=imbalance, **PAPER)
    _, domain, _ = _all_rows(ds)
    n, d = len(domain), ds.num_domains
    pi = np.arange(1, d + 1, dtype=np.float64) ** -imbalance
    pi /= pi.sum()
    counts = np.bincount(domain, minlength=d)
    # Multinomial counts: within 5 standard deviations of n * pi.
    assert np.all(np.abs(counts - n * pi) <= 5 * np.sqrt(n * pi * (1 - pi))), (counts, n * pi)


def test_labels_are_bernoulli_of_the_true_logit() -> None:
    cfg = synthetic.preset("paper", **SMALL)
    ds = synthetic.generate(cfg)
    feats, domain, label = _all_rows(ds)
    p = 1.0 / (1.0 + np.exp(-synthetic.ground_truth(cfg).logits(feats, domain)))
    for d in range(ds.num_domains):
        rows = domain == d
        expected, var = p[rows].sum(), (p[rows] * (1 - p[rows])).sum()
        assert abs(label[rows].sum() - expected) <= 5 * math.sqrt(var), d


def test_labels_are_learnable_and_bounded() -> None:
    cfg = synthetic.preset("paper", **SMALL)
    ds = synthetic.generate(cfg)
    feats, domain, label = _all_rows(ds)
    auc = roc_auc_score(label, synthetic.ground_truth(cfg).logits(feats, domain))
    # The realistic band for an oracle: far above chance, yet labels stay noisy.
    assert 0.75 <= auc <= 0.9, auc


def test_diversity_moves_domains_away_from_the_shared_function() -> None:
    corr = []
    for lam in (0.0, 0.4, 0.8, 1.0):
        cfg = synthetic.preset("paper", diversity=lam, **SMALL)
        feats, domain, _ = _all_rows(synthetic.generate(cfg))
        truth = synthetic.ground_truth(cfg)
        z, z_shared = truth.logits(feats, domain), truth.logits(feats, domain, diversity=0.0)
        corr.append(np.corrcoef(z, z_shared)[0, 1])
    assert corr[0] == pytest.approx(1.0, abs=1e-12)
    assert all(a > b for a, b in itertools.pairwise(corr)), corr


def test_splits_are_stratified_per_domain_and_label() -> None:
    ds = moefast.data.load("synthetic", **PAPER)
    _, domain, label = _all_rows(ds)
    for d in range(ds.num_domains):
        for y in (0.0, 1.0):
            m = int(((domain == d) & (label == y)).sum())
            got = [int(((s.domain == d) & (s.label == y)).sum()) for s in (ds.train, ds.val, ds.test)]
            want_train, want_val_end = math.floor(0.6 * m + 0.5), math.floor(0.8 * m + 0.5)
            assert got == [want_train, want_val_end - want_train, m - want_val_end], (d, y)


def test_domain_term_has_no_pairwise_part() -> None:
    # g_d is even in (p_u, q_i): no user-domain or item-domain linear term (what an FM's
    # pairwise products model) explains any of it, so adapters have something to add.
    # Many users and items, so that the sample of factors is close to its symmetric law.
    cfg = synthetic.preset("paper", num_users=20_000, num_items=20_000, num_domains=4)
    truth = synthetic.ground_truth(cfg)
    rng = np.random.default_rng(0)
    uid, item = rng.integers(0, cfg.num_users, 20_000), rng.integers(0, cfg.num_items, 20_000)
    x = np.hstack([np.ones((20_000, 1)), truth.user_factors[uid], truth.item_factors[item]])
    for d in range(cfg.num_domains):
        g = truth.domain_term(uid, item, np.full(20_000, d))
        residual = g - x @ np.linalg.lstsq(x, g, rcond=None)[0]
        assert 1 - residual.var() / g.var() < 0.01, d


def _arrays(ds: moefast.data.MultiDomainDataset) -> dict[str, np.ndarray]:
    out = {}
    for split_name in ("train", "val", "test"):
        split = getattr(ds, split_name)
        out |= {f"{split_name}.{k}": v.numpy() for k, v in split.features.items()}
        out |= {f"{split_name}.domain": split.domain.numpy(), f"{split_name}.label": split.label.numpy()}
    out |= {f"pretrained.{k}": v.numpy() for k, v in ds.pretrained.items()}
    return out


@pytest.mark.parametrize("name", ["paper", "taobao", "movielens"])
def test_clusters_off_leave_the_data_and_the_truth_bit_identical(name: str) -> None:
    # Issue 24: the related-domains knobs, off, must not move one draw of today's data.
    small = {"rows": 6_000}
    base = synthetic.preset(name, **small)
    want, truth = _arrays(synthetic.generate(base)), synthetic.ground_truth(base)
    feats, domain, _ = _all_rows(synthetic.generate(base))
    for off in ({"clusters": 4, "cluster_spread": 1.0}, {"clusters": 1}, {"clusters": base.num_domains}):
        cfg = synthetic.preset(name, **small, **off)
        got = _arrays(synthetic.generate(cfg))
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert value.dtype == got[key].dtype and value.tobytes() == got[key].tobytes(), (off, key)
        other = synthetic.ground_truth(cfg)
        assert other.logits(feats, domain).tobytes() == truth.logits(feats, domain).tobytes(), off


def test_clusters_move_only_the_domain_directions() -> None:
    base = synthetic.preset("taobao", rows=6_000)
    cfg = synthetic.preset("taobao", rows=6_000, clusters=4, cluster_spread=0.3)
    plain, clustered = synthetic.ground_truth(base), synthetic.ground_truth(cfg)
    for field in ("user_factors", "item_factors", "user_bias", "item_bias", "domain_bias", "numeric_weights"):
        assert np.array_equal(getattr(plain, field), getattr(clustered, field)), field
    assert not np.array_equal(plain.domain_user_directions, clustered.domain_user_directions)
    # The rows' ids and domains come from their own stream; only the labels (and so the
    # stratified split) follow the new truth.
    a, b = synthetic.generate(base), synthetic.generate(cfg)
    assert a.info["domain_rows"] == b.info["domain_rows"]
    assert np.array_equal(np.sort(_all_rows(a)[0]["uid"]), np.sort(_all_rows(b)[0]["uid"]))
    assert torch.equal(a.pretrained["uid"], b.pretrained["uid"])
    # The oracle reads the clustered truth: labels are Bernoulli of its logits.
    feats, domain, label = _all_rows(b)
    p = 1.0 / (1.0 + np.exp(-clustered.logits(feats, domain)))
    assert abs(label.sum() - p.sum()) <= 5 * math.sqrt((p * (1 - p)).sum())
    assert np.array_equal(synthetic.domain_clusters(cfg), np.arange(20) % 4)


def test_clusters_make_domains_of_one_cluster_alike() -> None:
    def corr(**knobs: object) -> synthetic.EffectCorrelations:
        return synthetic.domain_effect_correlations(synthetic.preset("taobao", **knobs))

    independent, half, close = corr(clusters=4), corr(clusters=4, cluster_spread=0.5), corr(clusters=4, cluster_spread=0.3)
    # Independent domains: the centring alone, about -1/(D - 1) = -0.05, within and across.
    for value in (independent["within"], independent["across"]):
        assert abs(value + 1 / 19) < 0.05, independent
    assert close["within"] > 0.5 and close["across"] < 0, close
    assert independent["within"] < half["within"] < close["within"], (independent, half, close)
    matrix = close["matrix"]
    assert matrix.shape == (20, 20) and np.allclose(np.diag(matrix), 1.0) and np.allclose(matrix, matrix.T)
    # The correlation of the logits' effects (each domain's true logit minus the mean over the
    # domains) is the same: the domain term carries every part that differs between domains.
    cfg = synthetic.preset("taobao", clusters=4, cluster_spread=0.3)
    rng = np.random.default_rng(0)
    uid, item = rng.integers(0, cfg.num_users, 4096), rng.integers(0, cfg.num_items, 4096)
    truth = synthetic.ground_truth(cfg)
    z = np.stack([truth.logits({"uid": uid, "item": item}, np.full(4096, d)) for d in range(20)])
    assert np.allclose(np.corrcoef(z - z.mean(axis=0)), matrix, atol=1e-9)


def test_cluster_knobs_are_validated() -> None:
    for bad in (0, 11, 2.0, True, -1):
        with pytest.raises(ValueError, match="clusters"):
            synthetic.preset("paper", clusters=bad)
    for bad in (0.0, 1.5, -0.2, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="cluster_spread"):
            synthetic.preset("paper", clusters=2, cluster_spread=bad)
    with pytest.raises(ValueError, match=r"cluster_spread 0\.5 needs clusters"):
        synthetic.preset("paper", cluster_spread=0.5)
    with pytest.raises(ValueError, match="2 domains"):
        synthetic.domain_effect_correlations(synthetic.preset("paper", num_domains=1))


def test_cluster_flags_and_toml_keys_reach_the_generator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moefast import cli
    from moefast.cli import grid as cli_grid
    from moefast.cli import train as cli_train
    from moefast.cli._options import given_options, load_dataset

    for command in ("train", "grid"):  # a "%" in a help text breaks --help
        with pytest.raises(SystemExit) as stop:
            cli.build_parser().parse_args([command, "--help"])
        assert stop.value.code == 0 and "--cluster-spread" in capsys.readouterr().out
    flags = ["train", "--num-domains", "6", "--clusters", "3", "--cluster-spread", "0.4"]
    config, _ = cli_train.resolve_config(given_options(cli.build_parser().parse_args(flags)))
    assert (config.data.clusters, config.data.cluster_spread) == (3, 0.4)
    toml = tmp_path / "run.toml"
    toml.write_text(cli_train.config_toml(config))
    assert cli_train.resolve_config(cli_train.read_config(str(toml)))[0].data == config.data
    toml.write_text("clusters = 3\ncluster-spread = 0.4\nnum-domains = 6\n")
    assert cli_train.resolve_config(cli_train.read_config(str(toml)))[0].data == config.data
    ds = load_dataset(dataclasses.replace(config.data, rows=3_000))
    assert (ds.info["config"]["clusters"], ds.info["config"]["cluster_spread"]) == (3, 0.4)
    grid, _ = cli_grid.resolve_grid(given_options(cli.build_parser().parse_args(["grid", *flags[1:]])))
    assert all((d.clusters, d.cluster_spread) == (3, 0.4) for d in grid.data)


def test_the_default_preset_is_the_same_from_every_entry_point(tmp_path: Path) -> None:
    """One owner of the default (issue 25): ``data.load``, the command line, the grid and the
    claims' core setting all generate ``DEFAULT_PRESET`` (taobao) when no preset is named."""
    from moefast.cli import grid as cli_grid
    from moefast.cli._options import load_dataset
    from moefast.config import DEFAULT_PRESET, DataConfig
    from moefast.experiments import claims
    from moefast.experiments.grid import GridConfig, load_data

    assert DEFAULT_PRESET == "taobao"
    knobs = {"rows": 300, "num_domains": 2, "num_users": 40, "num_items": 20}
    want = synthetic.generate(synthetic.preset(DEFAULT_PRESET, **knobs))
    config = DataConfig(rows=300, num_domains=2, num_users=40, num_items=20)
    for entry, ds in (("data.load", moefast.data.load("synthetic", **knobs)), ("moefast train", load_dataset(config)),
                      ("run_grid", load_data(config))):
        assert ds.name == want.name == f"synthetic-{DEFAULT_PRESET}", entry
        assert torch.equal(ds.train.label, want.train.label), entry
    # moefast grid names the default preset in its cells' labels; run_grid(GridConfig()) loads it.
    assert {d.preset for d in cli_grid.resolve_grid({"out": str(tmp_path)})[0].data} == {DEFAULT_PRESET}
    assert GridConfig(out=str(tmp_path)).data == (DataConfig(),)
    core = claims.plan_runs(claims.ClaimsConfig(out=str(tmp_path), sections=("core",)))
    assert core and {r.setting.preset for r in core} == {DEFAULT_PRESET}
