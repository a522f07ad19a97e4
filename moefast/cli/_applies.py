"""Options that do nothing in the chosen configuration: refused, or warned about.

The rule (docs/cli.md, "Options that do nothing"): an option set away from its default that no
method of the run can use is a mistake (a mistyped ``--method``, a flag from another
experiment), refused before any data loads, naming the option and what it needs. An option
that is already implied, or overridden, by another one the run gives is harmless: a warning.
Checks look at values, not at which keys were written, so that the resolved ``config.toml`` of
any run reads back without a complaint.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from moefast.cli._options import UserError
from moefast.config import (
    ExpertStopRule,
    MLoRAMode,
    PretrainedMode,
    RunConfig,
    SeedsGate,
    TowerKind,
    TrainConfig,
)

__all__ = [
    "check_dataset_options",
    "check_options",
    "check_run",
    "inapplicable",
    "redundant",
    "unused_keys",
    "warn",
]

_MOE = "moe-mlora only"
_MLORA = "mlora only"
_LATER = "the stages after the backbone's (moe-mlora, or mlora under --mlora-mode pretrain-freeze)"
# The options that only some methods use: key (the TOML name) -> (default, what uses it).
_SCOPED: dict[str, tuple[object, str]] = {
    "experts_per_domain": (1, _MOE),
    "gate_init": (None, _MOE),
    "gate_own_weight": (None, _MOE),
    "expert_max_epochs": (None, _MOE),
    "gate_max_epochs": (None, _MOE),
    "expert_stop": (ExpertStopRule.OWN_DOMAIN, _MOE),
    "mlora_mode": (MLoRAMode.JOINT, _MLORA),
    "train_backbone_in_later_stages": (False, _LATER),
    "frozen_path_dropout": (TrainConfig().frozen_path_dropout, _LATER),
}


def unused_keys(methods: Collection[TowerKind], train: TrainConfig) -> set[str]:
    """The keys of :data:`_SCOPED` that none of ``methods`` uses (a method's own ``config.toml``
    leaves them out, so that it reads back for that method alone)."""
    moe = TowerKind.MOE_MLORA in methods
    uses = {_MOE: moe, _MLORA: TowerKind.MLORA in methods,
            _LATER: moe or (TowerKind.MLORA in methods and train.mlora_mode is MLoRAMode.PRETRAIN_FREEZE)}
    return {key for key, (_, user) in _SCOPED.items() if not uses[user]}


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    return str(getattr(value, "value", value))


def inapplicable(
    methods: Collection[TowerKind], train: TrainConfig, run_options: Mapping[str, object] | None = None
) -> list[str]:
    """One message per option, set away from its default, that none of ``methods`` uses.

    Args:
        methods: the towers the run trains.
        train: its training options.
        run_options: the run-level options the caller found set (``experts_per_domain``,
            ``gate_init``, ``gate_own_weight``), by key.
    """
    values = {**{k: getattr(train, k) for k in _SCOPED if hasattr(train, k)}, **(run_options or {})}
    trains = ", ".join(m.value for m in methods)
    problems = []
    for key in sorted(unused_keys(methods, train), key=list(_SCOPED).index):
        default, user = _SCOPED[key]
        value = values.get(key, default)
        if value != default:
            flag = "--" + key.replace("_", "-") + ("" if value is True else f" {_shown(value)}")
            problems.append(f"{flag} applies to {user}, and this run trains {trains} (--method)")
    return problems


def redundant(train: TrainConfig, given: Collection[str] = ()) -> list[str]:
    """One message per option that another option already implies or overrides.

    ``given``: the option keys given on the command line (``expert_stop`` under
    ``--seeds-compat`` can only be told from its default that way).
    """
    notes = []
    if train.seeds_compat and train.train_backbone_in_later_stages:
        notes.append("--train-backbone-in-later-stages is implied by --seeds-compat (the backbone trains "
                     "in every stage)")
    if train.seeds_compat and "expert_stop" in given and train.expert_stop is not ExpertStopRule.ALL_DOMAINS:
        notes.append(f"--expert-stop {train.expert_stop.value} does nothing under --seeds-compat: its experts stop "
                     "on the mean validation AUC over all domains, like the seeds' code")
    if train.seeds_compat and "frozen_path_dropout" in given:
        notes.append("--frozen-path-dropout does nothing under --seeds-compat: every weight trains in every "
                     "stage, so no stage has a frozen path (dropout stays on, like the seeds' code)")
    return notes


def check_options(
    methods: Collection[TowerKind],
    train: TrainConfig,
    run_options: Mapping[str, object] | None = None,
    given: Collection[str] = (),
) -> None:
    """Before any data loads: :class:`UserError` naming every option that does nothing for
    ``methods`` (:func:`inapplicable`); a warning for each redundant one (:func:`redundant`)."""
    problems = inapplicable(methods, train, run_options)
    if train.seeds_gate is not SeedsGate.FROZEN and not train.seeds_compat:
        problems.append(f"--seeds-gate {train.seeds_gate.value} applies under --seeds-compat only")
    if problems:
        raise UserError("; ".join(problems) + ": drop it, or train the method it applies to")
    warn(redundant(train, given))


def check_run(config: RunConfig, given: Collection[str] = ()) -> None:
    """:func:`check_options` for a ``moefast train`` configuration."""
    run_options = {k: getattr(config, k) for k in ("experts_per_domain", "gate_init", "gate_own_weight")}
    check_options(config.methods, config.train, run_options, given)


def check_dataset_options(train: TrainConfig, dataset: Any) -> None:
    """Refuse training options the loaded dataset gives nothing to act on (:class:`UserError`)."""
    if train.pretrained is PretrainedMode.FINETUNE and not dataset.pretrained:
        raise UserError(f"--pretrained finetune does nothing here: dataset {dataset.name!r} has no "
                         "pretrained tables (e.g. --preset taobao, or Taobao's embedding files)")


def warn(notes: Sequence[str]) -> None:
    """Print each note as one ``moefast: warning:`` line on stderr."""
    for note in notes:
        print(f"moefast: warning: {note}", file=sys.stderr)
