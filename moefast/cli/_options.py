"""What every ``moefast`` command shares: the option tables, their parsers, the TOML reader,
the one-line error type and the dataset loader.

A flag's ``dest`` is its TOML key (dashes also accepted). Defaults are SUPPRESSed, so only the
flags actually given appear in the parsed namespace and override the config file.
"""

from __future__ import annotations

import argparse
import enum
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moefast.config import (
    DEFAULT_PRESET,
    BatchMode,
    DataConfig,
    EmbeddingOptimizer,
    ExpertStopRule,
    GateInit,
    MLoRAMode,
    Precision,
    PretrainedMode,
    SeedsGate,
    TablePrecision,
    TowerKind,
    TrainConfig,
    load_options,
)
from moefast.errors import UserError

__all__ = [
    "DATA_OPTIONS",
    "RUN_OPTIONS",
    "TRAIN_OPTIONS",
    "Option",
    "Parser",
    "UserError",
    "add_option_groups",
    "check_data_options",
    "given_options",
    "load_dataset",
    "parse_bool",
    "parse_choice",
    "parse_count_or_none",
    "parse_methods",
    "parse_on_off",
    "read_toml",
]

# The default budget (docs/method.md, "Budget"): validate every DEFAULT_EVAL_EVERY steps, stop
# after `patience` validations without improvement, cap a stage at DEFAULT_MAX_STEPS steps.
DEFAULT_EVAL_EVERY = TrainConfig().eval_every
DEFAULT_MAX_STEPS = TrainConfig().max_steps
DEFAULT_MAX_EPOCHS = TrainConfig().max_epochs


Conv = Callable[[str], Any]
# Every option: (flag without dashes, type, help).
Option = tuple[str, type | Conv, str]


def parse_choice(kind: type[enum.Enum]) -> Conv:
    def parse(text: str) -> Any:
        try:
            return kind(str(text).lower())
        except ValueError:
            choices = ", ".join(str(k.value) for k in kind)
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {choices}") from None

    parse.__name__ = kind.__name__
    return parse


def parse_methods(text: str) -> tuple[TowerKind, ...]:
    if str(text).lower() == "all":
        return tuple(TowerKind)
    parsed = []
    for part in str(text).split(","):
        try:
            parsed.append(TowerKind(part.strip().lower()))
        except ValueError:
            choices = ", ".join([*(k.value for k in TowerKind), "all"])
            raise argparse.ArgumentTypeError(f"unknown method {part.strip()!r}; choose {choices}") from None
    return tuple(parsed)


def parse_count_or_none(text: str) -> int | None:
    """A whole number >= 1, or ``none`` (no such cap / the per-epoch rule)."""
    if str(text).lower() == "none":
        return None
    return _at_least_one(text, "a whole number or none", " (or none)")


def parse_rows(text: str) -> int:
    """A whole number of rows >= 1."""
    return _at_least_one(text, "a whole number of rows")


def _at_least_one(text: str, what: str, alternative: str = "") -> int:
    """``text`` as a whole number >= 1; otherwise an error saying it is not ``what``."""
    try:
        value = int(str(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not >= 1{alternative}")
    return value


def parse_bytes(text: str) -> int:
    """A number of bytes >= 0, optionally with a K, M or G suffix (powers of 1024)."""
    raw = str(text).strip()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(raw[-1:].lower(), 1)
    digits = raw[:-1] if scale > 1 else raw
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes (e.g. 64M)")
    return int(digits) * scale


def parse_on_off(text: str) -> bool:
    """``on`` / ``off`` (and the booleans' other spellings)."""
    return parse_bool(text)


def parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


DATA_OPTIONS: list[Option] = [
    ("dataset", str, "dataset name: synthetic (default), movielens-1m, taobao, amazon-6, table (your own)"),
    ("preset", str, f"synthetic preset: {DEFAULT_PRESET} (default; Taobao-like, pretrained tables), "
     "movielens (MovieLens-like), paper or wide"),
    ("domain", str, "which column is the domain (MovieLens: gender, age or occupation)"),
    ("data-dir", str, "folder of a real dataset's raw files"),
    ("data", str, "table: a CSV / TSV (.gz) / Parquet file, or a folder of part files"),
    ("schema", str, "table: the schema TOML file (docs/data.md)"),
    ("vocab-from", str, "table: reuse this run directory's (or vocab.json's) vocabularies, statistics and domain map"),
    ("stream", parse_bool, "table: read the Parquet log as training goes, in bounded memory, instead of loading "
     "it (docs/data.md, \"Larger than memory\"); without --vocab-from, the first pass runs first"),
    ("shuffle-buffer", parse_rows, "streamed table: the shuffle buffer in rows per rank (changes results; "
     "default 262144)"),
    ("read-ahead", parse_bytes, "streamed table: bytes of row groups read ahead (speed only; default an eighth "
     "of the available memory, at most 256M); a number, optionally with K, M or G"),
    ("rows", int, "synthetic: number of rows"),
    ("num-domains", int, "synthetic: number of domains"),
    ("num-users", int, "synthetic: number of users"),
    ("num-items", int, "synthetic: number of items"),
    ("diversity", float, "synthetic: how far each domain's click function departs from the shared one"),
    ("imbalance", float, "synthetic: domain-size imbalance"),
    ("data-seed", int, "synthetic: generator seed"),
    ("numeric-fields", int, "synthetic: numeric (dense) fields x1..xN with a linear effect on the click (default 0)"),
    ("numeric-scale", float, "synthetic: standard deviation of the numeric fields' total effect on the logit (default 1)"),
    ("clusters", int, "synthetic: related domains: the number K of clusters, domain d in cluster d mod K (default none)"),
    ("cluster-spread", float, "synthetic: related domains: how far each domain sits from its cluster's "
     "prototype, in (0, 1] (default 1: independent domains)"),
]
RUN_OPTIONS: list[Option] = [
    ("model", str, "backbone (default deepfm)"),
    ("method", parse_methods, "base | mlora | moe-mlora | all (default), or a comma-separated list"),
    ("experts-per-domain", int, "MoE-MLoRA experts per domain (E = this x domains)"),
    ("gate-init", parse_choice(GateInit),
     "how the MoE-MLoRA gate starts: specialist (default; random under --seeds-compat) or random"),
    ("gate-own-weight", float, "specialist gate start: weight on each domain's own experts (default 0.8)"),
    ("backend", str, "reference | fast | auto"),
    ("out", str, "run directory (default runs/<timestamp>); one subdirectory per method"),
    ("overwrite", parse_bool, "replace the previous run in --out (only a directory moefast's "
     "marker says is a run directory)"),
]
TRAIN_OPTIONS: list[Option] = [
    ("device", str, "torch device (default cpu)"),
    ("seed", int, "seed of the model's initial weights, batch order and dropout (default 1024)"),
    ("lr", float, "Adam learning rate (default 1e-3)"),
    ("batch-size", int, "training batch size (default 1024)"),
    ("eval-batch-size", int, "evaluation batch size"),
    ("l2", float, "L2 weight on embeddings and linear parts (default 1e-5)"),
    ("eval-every", parse_count_or_none, f"validate every N optimizer steps of a stage, or none: after every "
     f"epoch (default {DEFAULT_EVAL_EVERY})"),
    ("max-steps", parse_count_or_none, f"step cap of every stage, or none (default {DEFAULT_MAX_STEPS})"),
    ("max-epochs", parse_count_or_none, f"epoch cap of every stage, or none (default {DEFAULT_MAX_EPOCHS})"),
    ("expert-max-epochs", int, "epoch cap of each MoE-MLoRA expert stage"),
    ("gate-max-epochs", int, "epoch cap of the MoE-MLoRA gate stage"),
    ("patience", int, "early-stopping patience in validations without improvement (default 3)"),
    ("frozen-path-dropout", parse_on_off, "on | off: the tower's dropout in the stages whose shared path is "
     f"frozen (moe-mlora's expert and gate stages, mlora's pretrain-freeze adapters; default "
     f"{'on' if TrainConfig().frozen_path_dropout else 'off'})"),
    ("batch-mode", parse_choice(BatchMode), "mixed (default) or single-domain batches (the seeds'; the default under --seeds-compat)"),
    ("expert-stop", parse_choice(ExpertStopRule), f"what an expert stage stops on: own-domain (its domain's "
     f"validation AUC), own-domain-loss (its logloss) or all-domains (the seeds'; default "
     f"{TrainConfig().expert_stop.value})"),
    ("mlora-mode", parse_choice(MLoRAMode), "joint (default) or pretrain-freeze"),
    ("embedding-optimizer", parse_choice(EmbeddingOptimizer),
     "adam (default: dense, the method's), lazy-adam or rowwise-adagrad (sparse, fused in backward)"),
    ("embedding-lr", float, "learning rate of the embedding optimizer (default: --lr)"),
    ("table-precision", parse_choice(TablePrecision),
     "embedding tables stored in fp32 (default), fp16 or bf16 (half tables need --embedding-optimizer "
     "lazy-adam or rowwise-adagrad; updates round stochastically)"),
    ("pretrained", parse_choice(PretrainedMode),
     "a dataset's pretrained tables: frozen in every stage (default) or finetune"),
    ("precision", parse_choice(Precision),
     "fp32 (default) or bf16-mixed: the wide products' operands in bfloat16, fp32 accumulation, "
     "fp32 master weights and optimizer state (docs/performance.md)"),
    ("train-backbone-in-later-stages", parse_bool,
     "keep embeddings and non-tower parts trainable in the expert and gate stages"),
    ("seeds-compat", parse_bool, "compute what the seeds' code computes as it runs (docs/method.md): "
     "the gated mixture and every weight trained in every stage, one Adam across stages, the best "
     "score carried across stages and the best weights reloaded after every validation, the Keras gate "
     "start, single-domain batches"),
    ("seeds-gate", parse_choice(SeedsGate), "under --seeds-compat: frozen (default; TF 1.12 as the seeds pin "
     "it: the gate keeps its Keras start) or gate-stage (a later TF 1.x: its linear part trains in the gate "
     "stage); docs/method.md"),
]
# The flags whose "none" is a value of its own (parse_count_or_none), by their dest.
_NONE_IS_A_VALUE = frozenset(name.replace("-", "_") for name, conv, _ in TRAIN_OPTIONS if conv is parse_count_or_none)
FLAGS_WITHOUT_VALUE = {"train-backbone-in-later-stages", "seeds-compat", "overwrite", "stream"}


def converters(options: Sequence[Option]) -> dict[str, type | Conv]:
    """``{dest: converter}`` of an option table: the keys a config file may hold."""
    return {name.replace("-", "_"): conv for name, conv, _ in options}


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_option_groups(
    parser: argparse.ArgumentParser, groups: Sequence[tuple[str, Sequence[Option]]]
) -> None:
    """Add every ``(flag, type, help)`` option, one argument group per title.

    Defaults are SUPPRESSed: only flags actually given appear, so they override the TOML file.
    """
    for title, options in groups:
        group = parser.add_argument_group(title)
        for name, conv, text in options:
            if name in FLAGS_WITHOUT_VALUE:
                group.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help=text)
            else:
                group.add_argument(f"--{name}", type=conv, default=argparse.SUPPRESS, help=text)


def add_config_and_quiet(parser: argparse.ArgumentParser, quiet_help: str) -> None:
    parser.add_argument("--config", help="TOML file whose keys mirror the flags")
    parser.add_argument("--quiet", "-q", action="store_true", default=None, help=quiet_help)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line (``command``, ``config`` and unset ones left out).

    A count-or-none flag given as ``none`` (``--eval-every none``, ``--max-steps none``) is kept:
    its ``None`` is a value (per epoch, no cap), not "not given" (its default is SUPPRESSed, so
    it is present only when given)."""
    return {k: v for k, v in vars(args).items()
            if k not in ("command", "config") and (v is not None or k in _NONE_IS_A_VALUE)}


def read_toml(path: str, options: Mapping[str, type | Conv]) -> dict[str, Any]:
    """A TOML config file's keys (flag names, dashes or underscores) converted like the flags."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path!r} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at byte "
                        f"{exc.start + 1} (TOML files are UTF-8)") from None
    except OSError as exc:  # a folder, no permission, an I/O error
        raise UserError(f"config file {path!r} cannot be read: {exc.strerror or exc}") from None
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest in spelled:
            # TOML sees two keys; taking either would drop the other without a word.
            raise UserError(f"config file {path!r}: keys {spelled[dest]!r} and {key!r} set the same option: "
                            "keep one")
        spelled[dest] = key
        if dest == "quiet":
            conv: type | Conv = parse_bool
        elif dest not in options:
            raise UserError(f"config file {path!r}: unknown key {key!r}")
        else:
            conv = options[dest]
        wrong = _wrong_toml_type(conv, value)
        if wrong is not None:
            raise UserError(f"config file {path!r}: key {key!r} must be {wrong}, got {value!r} "
                            f"(a TOML {_toml_type_name(value)})")
        if isinstance(value, bool):
            out[dest] = value
            continue
        if isinstance(value, list):  # method = ["base", "mlora"]
            value = ",".join(str(v) for v in value)
        try:
            out[dest] = conv(value) if isinstance(value, str) or conv in (int, float) else conv(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"config file {path!r}: key {key!r}: {exc}") from None
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _toml_type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


def _wrong_toml_type(conv: type | Conv, value: object) -> str | None:
    """What a TOML value for a key with converter ``conv`` must be, if ``value`` is not that.

    The TOML types are checked as they are, not through ``str()``: ``lr = true`` is not 1.0 and
    ``model = 3`` is not the string ``"3"``.
    """
    if conv is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if conv is float:
        return None if _is_number(value) else "a number"
    if conv is parse_bool:
        return None if isinstance(value, bool) else "true or false"
    if conv is parse_on_off:
        return None if isinstance(value, bool) or value in ("on", "off") else "\"on\", \"off\", true or false"
    if conv is parse_count_or_none:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or value == "none"
        return None if ok else "an integer or \"none\""
    if conv is str:
        return None if isinstance(value, str) else "a string"
    # Choices and comma-separated lists (method, the grid's lists): a string, a number for a
    # one-element numeric list, or an array of those.
    items = value if isinstance(value, list) else [value]
    if items and all(isinstance(v, str) or _is_number(v) for v in items):
        return None
    return "a string or an array of strings / numbers"


def load_dataset(data: DataConfig, *, progress: bool | None = None) -> Any:
    """The dataset a :class:`DataConfig` names; options that do not apply are user errors.
    ``progress=False`` hides the tabular source's reading bar (``None``: on a terminal)."""
    return _dataset(data, progress, check_only=False)


def check_data_options(data: DataConfig) -> None:
    """The checks of :func:`load_dataset` that read no data: the options, a table's schema (its
    size limits included) and its list of files (``moefast train --nproc`` runs them before any
    rank starts)."""
    _dataset(data, None, check_only=True)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _dataset(data: DataConfig, progress: bool | None, *, check_only: bool) -> Any:
    from moefast import data as data_module

    try:
        options = load_options(data, _flag)  # the one mapping (moefast.config): what applies where
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if data.dataset == "table":
        try:
            if check_only:
                from moefast.data.schema import load_schema
                from moefast.data.table import input_files

                sch = load_schema(options["schema"])
                input_files(options["path"])
                if options.get("stream"):
                    from moefast.data.firstpass import stream_files

                    stream_files(options["path"], sch)  # Parquet, and a split that needs no full read
                return None
            return data_module.load("table", **options, progress=progress)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if data.dataset != "synthetic":
        if data.data_dir is None:
            raise UserError(f"dataset {data.dataset!r} needs --data-dir (the folder of its raw files)")
        if not Path(data.data_dir).is_dir():
            raise UserError(f"--data-dir {data.data_dir!r} is not a directory")
    if check_only:
        return None
    return data_module.load(data.dataset, **options)
