"""The only importer of the compiled extensions ``moefast._C`` and ``moefast._tower_ops``.

Everything else reaches native code through :func:`native` and :func:`tower_op`, so a missing or
broken build shows up as one clear error that says how to fix it, at the moment a native op is
requested.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

_modules: dict[str, types.ModuleType] = {}
_errors: dict[str, ImportError] = {}
_tower_op: Any = None


def _load(name: str) -> types.ModuleType:
    """``moefast.<name>``; ``RuntimeError`` naming the fix when it is not built (or broken)."""
    if name not in _modules and name not in _errors:
        try:
            _modules[name] = importlib.import_module(f"moefast.{name}")
        except ImportError as exc:  # kept, re-raised with advice below
            _errors[name] = exc
    if name not in _modules:
        raise RuntimeError(
            f"moefast's C++ extension moefast.{name} is not available "
            f"({_errors[name]}); build it with `pip install --no-build-isolation -e .` or `make test`"
        )
    return _modules[name]


def native() -> types.ModuleType:
    """Return ``moefast._C`` (embedding engine, dropout masks)."""
    return _load("_C")


def available() -> bool:
    """True when ``moefast._C`` imports."""
    try:
        native()
    except RuntimeError:
        return False
    return True


def tower_op() -> Any:
    """``torch.ops.moefast.tower``, registered by importing ``moefast._tower_ops`` (built against
    libtorch); ``RuntimeError`` naming the fix when that module is not built."""
    global _tower_op
    if _tower_op is None:
        _load("_tower_ops")
        import torch

        _tower_op = torch.ops.moefast.tower
    return _tower_op


def tower_op_available() -> bool:
    """True when ``moefast._tower_ops`` imports."""
    if _tower_op is not None:
        return True
    try:
        tower_op()
    except RuntimeError:
        return False
    return True
