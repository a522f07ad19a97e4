"""The only importer of the compiled extension ``moefast._C``.

Everything else reaches native code through :func:`native`, so a missing or broken build shows
up as one clear error that says how to fix it, at the moment a native op is requested.
"""

from __future__ import annotations

import types

_module: types.ModuleType | None = None
_error: ImportError | None = None


def native() -> types.ModuleType:
    """Return ``moefast._C``; raise ``RuntimeError`` naming the fix when it is not built."""
    global _module, _error
    if _module is None and _error is None:
        try:
            from moefast import _C

            _module = _C
        except ImportError as exc:  # kept, re-raised with advice below
            _error = exc
    if _module is None:
        raise RuntimeError(
            "moefast's C++ extension moefast._C is not available "
            f"({_error}); build it with `pip install --no-build-isolation -e .` or `make test`"
        )
    return _module


def available() -> bool:
    """True when the compiled extension imports."""
    try:
        native()
    except RuntimeError:
        return False
    return True
