"""pytest plugin for `make sanitize`: run the tests against another build of the extensions.

``MOEFAST_EXT_DIR`` names a CMake build directory (``make sanitize`` builds the ASan + UBSan
extensions into ``build/sanitize``). ``moefast._C`` (required) and ``moefast._tower_ops`` (when
built there) are loaded from it under their usual names before any test imports them, so the
installed extensions are never used, and never touched: a process importing moefast from this
checkout meanwhile is unaffected. With ``MOEFAST_EXPECT_ASAN=1`` the plugin also refuses to run
unless libasan is loaded (``LD_PRELOAD``), so a sanitizer run cannot pass by not sanitizing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch  # noqa: F401  (before _tower_ops, which binds libtorch's symbols)

import moefast
from moefast import _ext


def _load(name: str, directory: Path) -> ModuleType | None:
    found = sorted(directory.glob(f"{name}.cpython-*.so"))
    if not found:
        return None
    full = f"moefast.{name}"
    loader = importlib.machinery.ExtensionFileLoader(full, str(found[0]))
    spec = importlib.util.spec_from_file_location(full, str(found[0]), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[full] = module
    setattr(moefast, name, module)
    _ext._modules[name] = module
    return module


def pytest_configure(config: object) -> None:
    directory = Path(os.environ["MOEFAST_EXT_DIR"]).resolve()
    if os.environ.get("MOEFAST_EXPECT_ASAN") == "1" and "libasan" not in Path("/proc/self/maps").read_text():
        raise RuntimeError("make sanitize: libasan is not loaded (LD_PRELOAD it into python)")
    for name in ("_C", "_tower_ops"):
        module = _load(name, directory)
        if module is None and name == "_C":
            raise RuntimeError(f"no moefast._C build in {directory}")
        if module is not None:
            print(f"moefast_sanitized: {module.__name__} from {module.__file__}", file=sys.stderr)
