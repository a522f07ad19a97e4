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
from collections.abc import Collection, Sequence
from typing import Any

from moefast.cli._options import UserError
from moefast.config import (
    ExpertStopRule,
    MLoRAMode,
    PretrainedMode,
    RunConfig,
    TowerKind,
    TrainConfig,
)

__all__ = ["check_dataset_options", "check_options", "check_run", "inapplicable", "redundant", "warn"]


def _names(methods: Collection[TowerKind]) -> str:
    return ", ".join(m.value for m in methods)


def inapplicable(
    methods: Collection[TowerKind], train: TrainConfig, moe_options: Sequence[str] = ()
) -> list[str]:
    """One message per option (set away from its default) that none of ``methods`` uses.

    Args:
        methods: the towers the run trains.
        train: its training options.
        moe_options: run-level options the caller found set that only MoE-MLoRA uses (flags
            such as ``--experts-per-domain 2``, ``--gate-init random``).
    """
    problems = []
    trains = f"this run trains {_names(methods)} (--method)"
    if TowerKind.MOE_MLORA not in methods:
        moe = [*moe_options]
        for flag, value, default in (
            ("--expert-max-epochs", train.expert_max_epochs, None),
            ("--gate-max-epochs", train.gate_max_epochs, None),
            ("--expert-stop", train.expert_stop, ExpertStopRule.OWN_DOMAIN),
        ):
            if value != default:
                moe.append(f"{flag} {getattr(value, 'value', value)}")
        problems += [f"{option} applies to moe-mlora only, and {trains}" for option in moe]
    if TowerKind.MLORA not in methods and train.mlora_mode is not MLoRAMode.JOINT:
        problems.append(f"--mlora-mode {train.mlora_mode.value} applies to mlora only, and {trains}")
    later = TowerKind.MOE_MLORA in methods or (
        TowerKind.MLORA in methods and train.mlora_mode is MLoRAMode.PRETRAIN_FREEZE
    )
    if train.train_backbone_in_later_stages and not later:
        problems.append("--train-backbone-in-later-stages applies to the stages after the backbone's "
                        f"(moe-mlora, or mlora under --mlora-mode pretrain-freeze), and {trains}")
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
    if train.seeds_compat and "expert_stop" in given and train.expert_stop is ExpertStopRule.OWN_DOMAIN:
        notes.append("--expert-stop own-domain does nothing under --seeds-compat: its experts stop on the "
                     "mean validation AUC over all domains, like the seeds' code")
    return notes


def moe_run_options(config: RunConfig) -> list[str]:
    """The run-level MoE-MLoRA options ``config`` sets away from their defaults."""
    found = []
    if config.experts_per_domain != 1:
        found.append(f"--experts-per-domain {config.experts_per_domain}")
    if config.gate_init is not None:
        found.append(f"--gate-init {config.gate_init.value}")
    if config.gate_own_weight is not None:
        found.append(f"--gate-own-weight {config.gate_own_weight}")
    return found


def check_options(
    methods: Collection[TowerKind], train: TrainConfig, moe_options: Sequence[str] = (), given: Collection[str] = ()
) -> None:
    """Before any data loads: :class:`UserError` naming every option that does nothing for
    ``methods`` (:func:`inapplicable`); a warning for each redundant one (:func:`redundant`)."""
    problems = inapplicable(methods, train, moe_options)
    if problems:
        raise UserError("; ".join(problems) + ": drop it, or train the method it applies to")
    warn(redundant(train, given))


def check_run(config: RunConfig, given: Collection[str] = ()) -> None:
    """:func:`check_options` for a ``moefast train`` configuration."""
    check_options(config.methods, config.train, moe_run_options(config), given)


def check_dataset_options(train: TrainConfig, dataset: Any) -> None:
    """Refuse training options the loaded dataset gives nothing to act on (:class:`UserError`)."""
    if train.pretrained is PretrainedMode.FINETUNE and not dataset.pretrained:
        raise UserError(f"--pretrained finetune does nothing here: dataset {dataset.name!r} has no "
                         "pretrained tables (e.g. --preset taobao, or Taobao's embedding files)")


def warn(notes: Sequence[str]) -> None:
    """Print each note as one ``moefast: warning:`` line on stderr."""
    for note in notes:
        print(f"moefast: warning: {note}", file=sys.stderr)
