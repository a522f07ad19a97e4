"""Atomic checkpoints that carry their stage (STYLE.md habit 14).

A checkpoint is a ``torch.save`` of ``{"format", "stage", "meta", "state_dict"}``, written to a
temporary file in the destination folder and renamed over the destination, so a crash never
leaves a half-written file under the final name. Loading checks the stage recorded in the file
against the stage the caller expects, then loads the state dict strictly.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, stage: str, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model``'s state dict with ``stage`` (e.g. ``"expert_3"``) and ``meta`` atomically."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "meta": dict(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def load_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, *, expected_stage: str | None = None
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` strictly and return its metadata (with ``"stage"``).

    Raises:
        ValueError: the file is missing or not a moefast checkpoint, its stage is not
            ``expected_stage``, or its tensors do not match ``model``'s exactly.
    """
    src = Path(path)
    if not src.is_file():
        raise ValueError(f"checkpoint {str(src)!r} does not exist")
    payload = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(src)!r} is not a moefast checkpoint (format {CHECKPOINT_FORMAT})")
    stage = payload["stage"]
    if expected_stage is not None and stage != expected_stage:
        raise ValueError(f"checkpoint {str(src)!r} holds stage {stage!r}, expected {expected_stage!r}")
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {str(src)!r} does not match the model: {exc}") from None
    return {**payload["meta"], "stage": stage}
