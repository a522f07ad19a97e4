"""Atomic checkpoints that carry their stage (STYLE.md habit 14), storing what a stage changed.

A checkpoint is a ``torch.save`` of a dict, written to a temporary file in the destination folder
and renamed over the destination, so a crash never leaves a half-written file under the final
name. Two formats:

- **full** (``format`` 1, :data:`CHECKPOINT_FORMAT`): ``{"format", "stage", "meta",
  "state_dict"}`` with every tensor of the model. A run's first stage writes one, and every run
  directory written before issue 25 holds only these.
- **delta** (``format`` 2, :data:`DELTA_FORMAT`): the same keys, ``state_dict`` holding only the
  tensors the stage changed (the parameters it trained and the buffers they own, such as a fused
  embedding optimizer's state), plus ``"base": {"path", "sha256"}``: the checkpoint holding the
  rest, as a path relative to this file's folder (the previous stage's, ``00_backbone.pt``) and
  the SHA-256 of its bytes. The base may itself be a delta: a chain ends at a full checkpoint.

Loading (:func:`read_checkpoint`, :func:`load_checkpoint`) reassembles the full state dict by
following the chain, each base's SHA-256 compared with the one recorded by the file that refers
to it (a missing, damaged or replaced base is a ``ValueError`` naming it), and applying the stored
tensors from the full checkpoint up, so the result is bitwise the model the stage saved. Loading
validates everything before it writes anything into the model: every file reads (an empty,
truncated or corrupt file is a ``ValueError`` naming it), the stage recorded in the file is the
one the caller expects, the model name and tower kind recorded in ``meta`` are the model's, and
every key, shape and dtype of the reassembled state matches; only then is it loaded strictly.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefast.runs.writer import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "DELTA_FORMAT", "file_sha256", "load_checkpoint", "read_checkpoint", "read_saved",
           "save_checkpoint", "state_mismatches"]

CHECKPOINT_FORMAT = 1  # a full checkpoint: every tensor of the model
DELTA_FORMAT = 2  # the tensors a stage changed, and a reference to the checkpoint holding the rest


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    stage: str,
    meta: Mapping[str, Any] | None = None,
    *,
    base: str | os.PathLike[str] | None = None,
    base_sha256: str | None = None,
    keys: Collection[str] | None = None,
) -> Path:
    """Write ``model``'s state dict with ``stage`` (e.g. ``"expert_3"``) and ``meta`` atomically
    (:func:`moefast.runs.writer.atomic_write`: a failed write raises ``WriteError`` and leaves
    nothing under ``path``).

    Without ``base`` the checkpoint is full. With ``base`` (the checkpoint the model was loaded
    from before the stage trained) it is a delta: only the state-dict entries named in ``keys``
    (what the stage changed, :func:`moefast.train.stages.stage_state_keys`) are stored, with
    ``base``'s path relative to ``path``'s folder and its SHA-256 (``base_sha256``, the digest
    recorded when it was written; computed from the file when not given).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "stage": stage, "meta": dict(meta or {})}
    if base is None:
        if keys is not None:
            raise ValueError("save_checkpoint: keys select a delta checkpoint's tensors, which needs a base")
        payload["state_dict"] = state
    else:
        if keys is None:
            raise ValueError("save_checkpoint: a delta checkpoint (base given) needs the keys the stage changed")
        unknown = sorted(set(keys) - state.keys())
        if unknown:
            raise ValueError(f"save_checkpoint: {len(unknown)} key(s) are not the model's (first {unknown[0]!r})")
        source = Path(base)
        digest = base_sha256 if base_sha256 is not None else file_sha256(source)
        payload.update(
            format=DELTA_FORMAT,
            state_dict={k: v for k, v in state.items() if k in keys},
            base={"path": Path(os.path.relpath(source, dest.parent)).as_posix(), "sha256": digest},
        )
    return atomic_write(dest, lambda handle: torch.save(payload, handle))


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (what a resume compares with the digest recorded when the run
    wrote the checkpoint; 1.3 GB/s measured on this 2-core machine)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _model_identity(model: nn.Module) -> dict[str, str]:
    """The metadata a checkpoint of ``model`` carries (``moefast.models.CTRModel``: its name and
    tower kind); empty for a module without them."""
    found: dict[str, str] = {}
    name = getattr(model, "name", None)
    if isinstance(name, str):
        found["model"] = name
    kind = getattr(getattr(model, "tower", None), "kind", None)
    value = getattr(kind, "value", None)
    if isinstance(value, str):
        found["tower"] = value
    return found


def read_saved(src: Path, what: str = "checkpoint", *, check_crc: bool = True) -> dict[str, Any]:
    """The ``torch.save`` payload of ``src`` (a dict), its archive checked (every member's CRC)
    first unless ``check_crc`` is false (the caller compared the file's SHA-256 with a recorded
    one already, which a flipped byte fails too); an unreadable file is a ``ValueError`` naming
    it as ``what``."""
    if not src.is_file():
        raise ValueError(f"{what} {str(src)!r} does not exist")
    if src.stat().st_size == 0:
        raise ValueError(f"{what} {str(src)!r} is empty (0 bytes)")
    # torch.load does not check the archive's CRC-32s: a flipped byte inside a tensor would load
    # silently. testzip reads every member and compares (about 1 GB/s, small beside the load).
    bad = None
    try:
        if check_crc:
            with zipfile.ZipFile(src) as archive:
                bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(
            f"{what} {str(src)!r} cannot be read (corrupt, truncated or not a moefast "
            f"checkpoint): {_describe(exc)}"
        ) from None
    if bad is not None:
        raise ValueError(f"{what} {str(src)!r} is corrupt: its member {bad!r} fails its CRC check")
    try:
        payload = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch.load raises many kinds for a damaged file (RuntimeError for a truncated zip,
        # UnpicklingError for bad opcodes, EOFError for a short read): all mean "unreadable".
        raise ValueError(
            f"{what} {str(src)!r} cannot be read (corrupt or truncated): {_describe(exc)}"
        ) from None
    if not isinstance(payload, dict):
        raise ValueError(f"{str(src)!r} is not a moefast {what}")
    return payload


def _read_payload(src: Path, *, check_crc: bool = True) -> dict[str, Any]:
    """The checkpoint's payload, checked for its shape; any unreadable file is a ``ValueError``."""
    payload = read_saved(src, check_crc=check_crc)
    if payload.get("format") not in (CHECKPOINT_FORMAT, DELTA_FORMAT):
        raise ValueError(
            f"{str(src)!r} is not a moefast checkpoint (format {CHECKPOINT_FORMAT} or {DELTA_FORMAT})"
        )
    stage, meta, state = payload.get("stage"), payload.get("meta"), payload.get("state_dict")
    if not isinstance(stage, str) or not isinstance(meta, dict) or not isinstance(state, dict):
        raise ValueError(
            f"checkpoint {str(src)!r} is damaged: it needs a str 'stage', a dict 'meta' and a dict "
            "'state_dict'"
        )
    if payload["format"] == DELTA_FORMAT:
        base = payload.get("base")
        if (not isinstance(base, dict) or not isinstance(base.get("path"), str) or not base["path"]
                or Path(base["path"]).is_absolute() or not isinstance(base.get("sha256"), str)):
            raise ValueError(
                f"checkpoint {str(src)!r} is damaged: a delta checkpoint needs a 'base' with a relative "
                "'path' and a 'sha256'"
            )
    return payload


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The payload of the checkpoint at ``path`` with its full state dict: a delta checkpoint's
    chain of bases followed down to a full checkpoint, each base's SHA-256 checked against the
    one recorded by the file that refers to it, and the stored tensors applied from the full
    checkpoint up (bitwise the model the stage saved). ``"files"``: the files read, ``path``
    first. Nothing is compared with a model here (:func:`load_checkpoint` does that).

    Raises:
        ValueError: naming the file: any file of the chain is missing, empty, corrupt or not a
            moefast checkpoint; a base's SHA-256 is not the recorded one (damaged or replaced);
            the chain refers back to itself.
    """
    src = Path(path)
    chain = [(src, _read_payload(src))]
    seen = {src.resolve()}
    while chain[-1][1]["format"] == DELTA_FORMAT:
        holder, payload = chain[-1]
        reference = payload["base"]
        base = holder.parent / reference["path"]
        if base.resolve() in seen:
            raise ValueError(f"checkpoint {str(holder)!r} is damaged: its base {str(base)!r} refers back to it")
        if not base.is_file():
            raise ValueError(f"checkpoint {str(base)!r}, the base of {str(holder)!r}, does not exist")
        if file_sha256(base) != reference["sha256"]:
            raise ValueError(
                f"checkpoint {str(base)!r} is not the base {str(holder)!r} was written on (its SHA-256 differs "
                "from the recorded one): it was damaged or replaced"
            )
        seen.add(base.resolve())
        # Its bytes are the ones recorded: the CRC check would find nothing the digest did not.
        chain.append((base, _read_payload(base, check_crc=False)))
    state: dict[str, Any] = {}
    for _, payload in reversed(chain):
        state.update(payload["state_dict"])
    top = chain[0][1]
    return {**top, "state_dict": state, "files": [file for file, _ in chain]}


def state_mismatches(
    own: Mapping[str, Any], state: Mapping[str, Any]
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """How ``state`` differs from the state dict ``own`` (the one check a checkpoint and the
    resume snapshot make before anything is copied): the keys it misses, the keys it has beyond
    ``own``'s, and for each of ``own``'s tensors it holds as something else, or with another
    shape or dtype, ``(key, what differs)``, in ``own``'s order."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong: list[tuple[str, str]] = []
    for key, mine in own.items():
        theirs = state.get(key)
        if key not in state or not isinstance(mine, torch.Tensor):
            continue
        if not isinstance(theirs, torch.Tensor):
            wrong.append((key, f"is a {type(theirs).__name__}, not a tensor"))
        elif theirs.shape != mine.shape:
            wrong.append((key, f"has shape {tuple(theirs.shape)}, the model's {tuple(mine.shape)}"))
        elif theirs.dtype != mine.dtype:
            wrong.append((key, f"has dtype {theirs.dtype}, the model's {mine.dtype}"))
    return missing, unexpected, wrong


def _check_state(src: Path, model: nn.Module, state: Mapping[str, Any]) -> None:
    """Every key, shape and dtype of ``state`` against ``model``'s, before anything is copied."""
    missing, unexpected, wrong = state_mismatches(model.state_dict(), state)
    problems: list[str] = []
    if missing:
        problems.append(f"missing {len(missing)} key(s) (first {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (first {unexpected[0]!r})")
    problems.extend(f"{key!r} {what}" for key, what in wrong)
    if problems:
        raise ValueError(f"checkpoint {str(src)!r} does not match the model: {'; '.join(problems[:3])}")


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    expected_stage: str | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` strictly and return its metadata (with ``"stage"``).

    A delta checkpoint is reassembled first (:func:`read_checkpoint`: every base's SHA-256 is
    checked). Everything is checked before the first tensor is copied (the files read, they are
    moefast checkpoints, its stage, its recorded model and tower, every key, shape and dtype), so a
    refused load leaves ``model`` untouched. ``dataset``, when given, is compared with the
    dataset name the checkpoint recorded (``meta["dataset"]``, written by ``fit``).

    Raises:
        ValueError: naming the file: it (or a base it refers to) is missing, empty, truncated or
            otherwise unreadable, not a moefast checkpoint, a base is not the one recorded, its stage is not ``expected_stage``, it was saved from another
            model, tower kind or dataset, or its tensors do not match ``model``'s exactly.
    """
    src = Path(path)
    payload = read_checkpoint(src)
    stage: str = payload["stage"]
    meta: dict[str, Any] = payload["meta"]
    if expected_stage is not None and stage != expected_stage:
        raise ValueError(f"checkpoint {str(src)!r} holds stage {stage!r}, expected {expected_stage!r}")
    identity = _model_identity(model)
    if dataset is not None:
        identity["dataset"] = dataset
    differ = [f"{key} {meta[key]!r} (the {'dataset' if key == 'dataset' else 'model'}: {value!r})"
              for key, value in identity.items()
              if key in meta and meta[key] != value]
    if differ:
        raise ValueError(
            f"checkpoint {str(src)!r} does not match the model: it was saved from {', '.join(differ)}"
        )
    _check_state(src, model, payload["state_dict"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:  # checked above; kept so a case the checks miss is still a ValueError
        raise ValueError(f"checkpoint {str(src)!r} does not match the model: {exc}") from None
    return {**meta, "stage": stage}
