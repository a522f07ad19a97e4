"""The package itself: public surface, layout of the install, the native build and its stub."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import zipfile

import moefast
from moefast import _ext

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_public_surface_is_pinned() -> None:
    assert sorted(moefast.__all__) == sorted(
        [
            "FeatureSpec",
            "Pooling",
            "TrainConfig",
            "__version__",
            "config",
            "convert",
            "data",
            "models",
            "nn",
            "ops",
            "reference",
            "train",
        ]
    )
    for name in moefast.__all__:
        assert hasattr(moefast, name), name


def test_import_touches_neither_triton_nor_cuda() -> None:
    code = (
        "import sys, torch\n"
        "calls = []\n"
        "torch.cuda.is_available = lambda: calls.append(1) or False\n"
        "torch.cuda.init = lambda: calls.append(2)\n"
        "import moefast\n"
        "assert 'triton' not in sys.modules, 'moefast imported triton'\n"
        "assert not calls, f'moefast queried CUDA at import: {calls}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_install_as_subpackage_only() -> None:
    spec = importlib.util.find_spec("moefast.kernels")
    assert spec is not None and spec.origin is not None
    assert pathlib.Path(spec.origin).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    # The editable install puts the source root on sys.path; `kernels` must still refuse to
    # import as a top-level package (run from outside the source tree).
    out = subprocess.run(
        [sys.executable, "-c", "import kernels"], capture_output=True, text=True, cwd="/"
    )
    assert out.returncode != 0 and "imported as moefast.kernels" in out.stderr, out.stderr


def test_wheel_layout(tmp_path: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("moefast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moefast/kernels/__init__.py" in names
    for module in ("_C", "_tower_ops"):
        assert any(n.startswith(f"moefast/{module}.") and n.endswith(".so") for n in names), module
    assert "moefast/_C.pyi" in names and "moefast/py.typed" in names
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"moefast", wheel.name.split("-")[0] + "-0.1.0.dist-info"}, top_level


def test_native_extension_is_built_for_speed() -> None:
    info = _ext.native().core_build_info()
    assert "opt=-O3" in info and "optimize=speed" in info, info


def test_stub_is_current(tmp_path: pathlib.Path) -> None:
    fresh = tmp_path / "_C.pyi"
    subprocess.run(
        [sys.executable, "-m", "nanobind.stubgen", "-q", "-m", "moefast._C", "-o", str(fresh)],
        check=True,
    )
    committed = ROOT / "moefast" / "_C.pyi"
    assert committed.read_text() == fresh.read_text(), "stale stub: run `make stubs`"
