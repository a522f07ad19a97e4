"""The only importer of the compiled extensions ``moefast._C`` and ``moefast._tower_ops``.

Everything else reaches native code through :func:`native` and :func:`tower_op`, so a missing or
broken build shows up as one clear error that says how to fix it, at the moment a native op is
requested.

``moefast._C`` (the embedding engine, dropout masks) does not link torch. ``moefast._tower_ops``
(the CPU tower as one C++ autograd node) links the libtorch it was built against, so it is loaded
only after its build stamp, ``_tower_ops.json`` beside it (torch version and C++11 ABI), matches
the running torch: a module built for another torch could bind the wrong symbols or crash. When
it is not built (an isolated build could not see torch) or its stamp does not match, the tower
runs as the Python node (:class:`moefast.ops._tower_cpu.CpuTowerFunction`, the same function) and
one :class:`TowerOpWarning` per process says so and how to build the C++ node.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import types
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "TowerOpWarning",
    "available",
    "build_report",
    "native",
    "tower_op",
    "tower_op_available",
    "tower_op_refusal",
]

_modules: dict[str, types.ModuleType] = {}
_errors: dict[str, ImportError] = {}
_tower_op: Any = None
_tower_warned = False
STAMP = "_tower_ops.json"
REBUILD = "install torch first, then `pip install --no-build-isolation --force-reinstall <moefast source>` (or `make setup` in a checkout)"


class TowerOpWarning(UserWarning):
    """The C++ tower node is not used in this process; the Python node runs instead."""


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


def running_torch() -> dict[str, Any]:
    """What a build stamp must match: the running torch's version and C++11 ABI."""
    import torch

    return {"torch_version": str(torch.__version__), "cxx11_abi": int(torch._C._GLIBCXX_USE_CXX11_ABI)}


def tower_op_refusal() -> str | None:
    """Why ``moefast._tower_ops`` must not be loaded here (None: it may be).

    Decided from files only, before anything is loaded: whether the module exists and whether
    its build stamp names the running torch.
    """
    if "moefast._tower_ops" in _modules:
        return None
    spec = importlib.util.find_spec("moefast._tower_ops")
    if spec is None or spec.origin is None:
        return "moefast._tower_ops is not built (torch was not importable when moefast was built)"
    stamp_path = Path(spec.origin).parent / STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError) as exc:
        return f"moefast._tower_ops has no readable build stamp {stamp_path} ({exc})"
    running = running_torch()
    if any(stamp.get(key) != value for key, value in running.items()):
        return (f"moefast._tower_ops was built for torch {stamp.get('torch_version')} (C++11 ABI "
                f"{stamp.get('cxx11_abi')}) and this is torch {running['torch_version']} (C++11 ABI "
                f"{running['cxx11_abi']}); it is not loaded, so no wrong libtorch symbols are bound")
    return None


def tower_op() -> Any:
    """``torch.ops.moefast.tower``, registered by importing ``moefast._tower_ops`` (built against
    libtorch); ``RuntimeError`` naming the fix when it is not built or built for another torch."""
    global _tower_op
    if _tower_op is None:
        refusal = tower_op_refusal()
        if refusal is not None:
            raise RuntimeError(f"{refusal}; to build it, {REBUILD}")
        _load("_tower_ops")
        import torch

        _tower_op = torch.ops.moefast.tower
    return _tower_op


def tower_op_available(*, warn: bool = True) -> bool:
    """True when the C++ tower node can run; the first False of a process warns once
    (:class:`TowerOpWarning`) that the Python node runs instead, and why (unless ``warn`` is
    False: a caller that only asks)."""
    global _tower_warned
    if _tower_op is not None:
        return True
    try:
        tower_op()
    except RuntimeError as exc:
        if warn and not _tower_warned:
            _tower_warned = True
            warnings.warn(
                f"moefast: the C++ tower node is not used, the Python node runs instead (same results, "
                f"a slower CPU step; docs/performance.md): {exc}",
                TowerOpWarning,
                stacklevel=2,
            )
        return False
    return True


def build_report() -> str:
    """Which compiled modules this install runs, and why not (what ``moefast --version`` adds)."""
    try:
        native()
        engine = "moefast._C (embedding engine): loaded"
    except RuntimeError as exc:
        engine = f"moefast._C (embedding engine): not available: {exc}"
    try:
        tower_op()
        node = f"moefast._tower_ops (C++ tower node): loaded, built for torch {running_torch()['torch_version']}"
    except RuntimeError as exc:
        node = f"moefast._tower_ops (C++ tower node): not used, the Python node runs: {exc}"
    return f"{engine}\n{node}"
