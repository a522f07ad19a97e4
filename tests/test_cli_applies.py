"""Options that do nothing in the chosen configuration: refused before any data loads, or
warned about (docs/cli.md, "Options that do nothing")."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from moefast import cli
from moefast.cli import _applies
from moefast.cli import grid as cli_grid
from moefast.cli import train as cli_train
from moefast.config import TowerKind
from moefast.experiments.claims import ClaimsConfig, plan_runs

TINY = ["--rows", "300", "--num-domains", "2", "--num-users", "30", "--num-items", "20", "--max-epochs", "1"]


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before the data loads."""

    def refuse(*_: object) -> None:
        raise AssertionError("the data loaded before the options were checked")

    monkeypatch.setattr(cli_train, "load_dataset", refuse)
    monkeypatch.setattr(cli_grid, "load_dataset", refuse)


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "base", "--experts-per-domain", "2"], "--experts-per-domain 2 applies to moe-mlora only"),
    (["--method", "base,mlora", "--gate-init", "random"], "--gate-init random applies to moe-mlora only"),
    (["--method", "mlora", "--gate-own-weight", "0.7"], "--gate-own-weight 0.7 applies to moe-mlora only"),
    (["--method", "mlora", "--expert-max-epochs", "2"], "--expert-max-epochs 2 applies to moe-mlora only"),
    (["--method", "base", "--gate-max-epochs", "2"], "--gate-max-epochs 2 applies to moe-mlora only"),
    (["--method", "mlora", "--expert-stop", "all-domains"], "--expert-stop all-domains applies to moe-mlora only"),
    (["--method", "base,moe-mlora", "--mlora-mode", "pretrain-freeze"], "--mlora-mode pretrain-freeze applies to mlora only"),
    (["--method", "base", "--train-backbone-in-later-stages"], "--train-backbone-in-later-stages applies to the stages"),
    (["--method", "mlora", "--train-backbone-in-later-stages"], "--train-backbone-in-later-stages applies to the stages"),
    (["--method", "mlora", "--embedding-lr", "0.01"], "embedding_lr applies to a fused embedding optimizer"),
])
def test_train_refuses_an_option_no_method_uses(
    argv: list[str], message: str, no_data: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moefast: error: ") and message in err and err.count("\n") == 1
    assert "this run trains" in err or "embedding_lr" in err


def test_every_refusal_is_named_at_once(no_data: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--method", "base", "--experts-per-domain", "3", "--gate-max-epochs", "1",
                     "--mlora-mode", "pretrain-freeze"]) == 2
    err = capsys.readouterr().err
    for flag in ("--experts-per-domain 3", "--gate-max-epochs 1", "--mlora-mode pretrain-freeze"):
        assert flag in err


# Every option above, with a method that uses it: nothing to refuse or warn about.
USED = [
    ["--method", "moe-mlora", "--experts-per-domain", "2", "--gate-init", "random", "--expert-max-epochs", "2",
     "--gate-max-epochs", "2", "--expert-stop", "all-domains", "--train-backbone-in-later-stages"],
    ["--method", "moe-mlora", "--gate-own-weight", "0.7"],
    ["--method", "mlora", "--mlora-mode", "pretrain-freeze", "--train-backbone-in-later-stages"],
    ["--method", "all", "--experts-per-domain", "2", "--mlora-mode", "pretrain-freeze"],
    ["--embedding-optimizer", "lazy-adam", "--embedding-lr", "0.05"],
    ["--seeds-compat"],
    [],
]


@pytest.mark.parametrize("argv", USED)
def test_options_a_method_uses_pass_and_read_back(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["train", *argv])
    config, _ = cli_train.resolve_config(cli_train.given_options(args))
    _applies.check_run(config, cli_train.given_options(args))
    # The resolved config.toml a run writes reads back without a complaint.
    written = tmp_path / "config.toml"
    written.write_text(cli_train.config_toml(config))
    again, _ = cli_train.resolve_config(cli_train.read_config(str(written)))
    _applies.check_run(again)
    assert capsys.readouterr().err == ""


def test_each_methods_own_config_reads_back_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A multi-method run writes each method's config.toml; MoE-MLoRA's options stay in its own
    # and leave the others', which then read back as runs of that method alone.
    args = cli.build_parser().parse_args(["train", "--method", "all", "--experts-per-domain", "2", "--gate-init",
                                          "random", "--gate-max-epochs", "2", "--mlora-mode", "pretrain-freeze"])
    config, _ = cli_train.resolve_config(cli_train.given_options(args))
    for kind in TowerKind:
        written = tmp_path / f"{kind.value}.toml"
        written.write_text(cli_train.config_toml(replace(config, methods=(kind,))))
        again, _ = cli_train.resolve_config(cli_train.read_config(str(written)))
        _applies.check_run(again)
        moe = kind is TowerKind.MOE_MLORA
        assert (again.experts_per_domain, again.gate_init is not None, again.train.gate_max_epochs) == (
            (2, True, 2) if moe else (1, False, None))
        assert (again.train.mlora_mode.value == "pretrain-freeze") == (kind is TowerKind.MLORA)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("argv", "note"), [
    (["--seeds-compat", "--train-backbone-in-later-stages"], "implied by --seeds-compat"),
    (["--seeds-compat", "--expert-stop", "own-domain"], "does nothing under --seeds-compat"),
])
def test_redundant_options_are_warned_about(argv: list[str], note: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["train", *argv])
    config, _ = cli_train.resolve_config(cli_train.given_options(args))
    _applies.check_run(config, cli_train.given_options(args))
    err = capsys.readouterr().err
    assert err.startswith("moefast: warning: ") and note in err


def test_pretrained_finetune_without_pretrained_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", *TINY, "--method", "base", "--pretrained", "finetune", "-q"]
    assert cli.main([*argv, "--preset", "movielens", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--pretrained finetune does nothing here" in err and "no pretrained tables" in err
    assert not (tmp_path / "a" / "metrics.json").exists()
    assert cli.main([*argv, "--preset", "taobao", "--out", str(tmp_path / "b")]) == 0


def test_grid_refuses_experts_without_moe_mlora(no_data: None, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["grid", "--method", "base,mlora", "--experts-per-domain", "2", "--out", str(tmp_path)]) == 2
    assert "--experts-per-domain 2 applies to moe-mlora only" in capsys.readouterr().err
    assert cli.main(["grid", "--method", "mlora", "--gate-max-epochs", "2", "--out", str(tmp_path)]) == 2
    assert "--gate-max-epochs 2 applies to moe-mlora only" in capsys.readouterr().err


def test_grid_and_claims_settings_never_trip_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    # The grid's defaults (every method, k = 1..4), and each of its cells on its own.
    config, _ = cli_grid.resolve_grid({})
    _applies.check_options(config.methods, config.train)
    # The claims runner trains each method alone with its own settings.
    plan = ClaimsConfig()
    cells = {(run.protocol, run.variant.seeds_compat, run.variant.kind) for run in plan_runs(plan)}
    assert len(cells) > 10
    for (protocol, compat, kind), dropout in itertools.product(cells, (False, True)):
        train = plan.train_config(seed=1, protocol=protocol, seeds_compat=compat, dropout=dropout)
        assert _applies.inapplicable([kind], train) == [] and _applies.redundant(train) == []
    assert capsys.readouterr().err == ""
