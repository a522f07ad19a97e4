"""`moefast train`: one end-to-end run on a tiny synthetic dataset; TOML; one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moefast
from moefast import cli
from moefast.cli import train as cli_train
from moefast.config import BatchMode, TowerKind
from moefast.experiments.methods import run_methods

TINY = ["--rows", "1500", "--num-domains", "3", "--num-users", "100", "--num-items", "50",
        "--max-epochs", "1", "--batch-size", "256"]


@pytest.mark.slow  # among the slowest tests (--durations): selection only, make test runs it
def test_train_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    # --quiet hides progress; what remains are the one-line warnings of stages that ended at the
    # cap (TINY caps every stage at one epoch).
    assert all(line.startswith("moefast: warning: stage ") and "ended at its cap" in line
               for line in printed.err.splitlines()), printed.err
    table = printed.out
    header = next(line for line in table.splitlines() if line.startswith("domain "))
    assert header.split()[-3:] == ["base", "mlora", "moe-mlora"]
    for label in ("mean AUC", "WAUC"):
        assert any(line.startswith(label) for line in table.splitlines()), label
    combined = json.loads((out / "metrics.json").read_text())["methods"]
    assert list(combined) == ["base", "mlora", "moe-mlora"]
    for method in combined:
        run = out / method
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["model"] == "deepfm"
        assert metrics == combined[method]
        assert json.loads((run / "settings.json").read_text())["dataset"]["name"] == "synthetic-taobao"  # the default preset
        wauc = f"{metrics['test']['wauc']:.4f}"
        assert wauc in next(line for line in table.splitlines() if line.startswith("WAUC"))
        for name in ("config.toml", "settings.json", "predictions.csv", "val_auc.png", "per_domain_auc.png"):
            assert (run / name).is_file(), (method, name)
        assert not (run / "config.json").exists()  # settings.json is the one record of how it started
        assert list((run / "checkpoints").glob("*.pt"))
    assert (out / "moe-mlora" / "gate_weights.png").is_file()
    assert (out / "per_domain_auc.png").is_file() and (out / "table.txt").is_file()
    # The resolved config reads back to the same configuration.
    config, _ = cli_train.resolve_config(cli_train.read_config(str(out / "config.toml")))
    assert config.data.rows == 1500 and config.data.num_domains == 3 and config.data.num_users == 100
    assert config.train.max_epochs == 1 and config.methods == tuple(TowerKind)
    # The experiment is a Python function too (the command calls it): the same run, in memory.
    fitted = run_methods(replace(config, methods=(TowerKind.BASE,), out=None))  # loads config.data as the CLI does
    assert list(fitted) == ["base"] and fitted["base"].run_dir is None
    assert fitted["base"].metrics["test"] == combined["base"]["test"]


def test_toml_keys_mirror_flags_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        'model = "wdl"\nmethod = ["mlora"]\nmax-epochs = 4\nbatch_mode = "mixed"\n'
        "experts-per-domain = 2\nquiet = true\ntrain_backbone_in_later_stages = true\n"
    )
    options = cli_train.read_config(str(path))
    options.update({"max_epochs": 7})  # as if --max-epochs 7 were given
    config, quiet = cli_train.resolve_config(options)
    assert (config.model, config.methods, config.experts_per_domain) == ("wdl", (TowerKind.MLORA,), 2)
    assert config.train.max_epochs == 7 and config.train.batch_mode is BatchMode.MIXED
    assert config.train.train_backbone_in_later_stages and quiet and not config.train.progress


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--config", "/no/such/file.toml"], "config file '/no/such/file.toml' does not exist"),
        (["--method", "lora"], "unknown method 'lora'"),
        (["--experts-per-domain", "0"], "experts_per_domain must be > 0"),
        (["--dataset", "movielens-1m", "--data-dir", "/no/such/dir"], "is not a directory"),
        (["--dataset", "nope", "--data-dir", "."], "unknown dataset 'nope'"),
        (["--domain", "age"], "does not apply to the synthetic dataset"),
        (["--backend", "gpu"], "unknown backend 'gpu'"),
        (["--device", "tpu:x"], "--device 'tpu:x'"),
        (["--max-epochs", "zero"], "is not a whole number or none"),
        (["--max-steps", "0"], "is not >= 1 (or none)"),
        (["--device", "meta"], "--device 'meta': training runs on cpu or cuda devices only"),
        (["--device", "xla"], "--device 'xla': training runs on cpu or cuda devices only"),
    ],
)
def test_user_mistakes_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli.main(["train", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("moefast"), err
    assert message in err


def test_bad_toml_key_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("learning_rate = 0.1\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err
    path.write_text("max_epochs = 2.5\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "key 'max_epochs' must be an integer or \"none\", got 2.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lr = true", "key 'lr' must be a number, got True (a TOML boolean)"),
        ('lr = "fast"', "key 'lr' must be a number, got 'fast' (a TOML string)"),
        ("lr = {a = 1}", "key 'lr' must be a number, got {'a': 1} (a TOML table)"),
        ('max_epochs = "3"', "key 'max_epochs' must be an integer or \"none\", got '3' (a TOML string)"),
        ('patience = "3"', "key 'patience' must be an integer, got '3' (a TOML string)"),
        ("model = 3", "key 'model' must be a string, got 3 (a TOML integer)"),
        ("seeds_compat = 1", "key 'seeds_compat' must be true or false, got 1 (a TOML integer)"),
        ("quiet = \"yes\"", "key 'quiet' must be true or false, got 'yes' (a TOML string)"),
        ("method = [1.5, {x = 1}]", "key 'method' must be a string or an array"),
        ("batch_mode = 2026-01-01", "key 'batch_mode' must be a string or an array"),
    ],
)
def test_toml_value_of_the_wrong_type_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config file {str(path)!r}: {message}" in err, err
    assert not (tmp_path / "run").exists()


def test_module_entry_help_and_version() -> None:
    done = subprocess.run([sys.executable, "-m", "moefast", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--experts-per-domain" in done.stdout and "--quiet" in done.stdout
    done = subprocess.run([sys.executable, "-m", "moefast", "--version"], capture_output=True, text=True)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[0] == f"moefast {moefast.__version__}", done
    # Then which compiled modules run (make setup builds both).
    assert lines[1:] == ["moefast._C (embedding engine): loaded",
                         f"moefast._tower_ops (C++ tower node): loaded, built for torch {torch.__version__}"], lines


def test_every_command_is_listed_and_documented() -> None:
    """Each module of COMMANDS becomes a subcommand, in order, with its own --help."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subparsers.choices) == [c.NAME for c in cli.COMMANDS]
    assert {"train", "grid"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        assert sub.prog == f"moefast {name}" and sub.format_help().strip(), name


def test_reproduce_help_lists_every_claims_section() -> None:
    """The --sections help comes from the claims' SECTIONS (it once left out ``related``)."""
    from moefast.experiments.claims import SECTIONS

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sections = next(a for a in subparsers.choices["reproduce"]._actions if "--sections" in a.option_strings)
    assert sections.help == f"comma-separated: {', '.join(SECTIONS)}, or all (default)"
    assert "related" in SECTIONS
