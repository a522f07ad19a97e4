"""The package itself: public surface, layout of the install, the native build and its stub."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import pathlib
import platform
import subprocess
import sys
import tomllib
import zipfile

import pytest
from _install import (
    fresh_venv,
    make_view,
    pip_install,
    requires_dist,
    run,
    runtime_closure,
    wheel_metadata,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import moefast
from moefast import _ext

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_public_surface_is_pinned() -> None:
    assert sorted(moefast.__all__) == sorted(
        [
            "FeatureSpec",
            "Pooling",
            "TowerConfig",
            "TowerKind",
            "TrainConfig",
            "__version__",
            "config",
            "convert",
            "data",
            "errors",
            "export",
            "models",
            "nn",
            "ops",
            "reference",
            "train",
        ]
    )
    for name in moefast.__all__:
        assert hasattr(moefast, name), name


def test_train_surface_is_pinned_and_the_plumbing_moved() -> None:
    """``moefast.train`` exports what a user calls; the step plumbing that left it still imports
    from there for this wave, with a DeprecationWarning naming its home (the same object)."""
    import moefast.train

    assert sorted(moefast.train.__all__) == sorted(
        ["CapWarning", "EvalMetrics", "FitResult", "NonFiniteError", "Stage", "StageRecord", "StageStep", "auc",
         "evaluate_scores", "fit", "load_checkpoint", "logloss", "plan_stages", "predict", "save_checkpoint",
         "set_stage"]
    )
    for name in moefast.train.__all__:
        assert hasattr(moefast.train, name), name
    for name, home in moefast.train.MOVED.items():
        with pytest.warns(DeprecationWarning, match=f"{home}.{name}"):
            moved = getattr(moefast.train, name)
        assert moved is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError):
        moefast.train.no_such_name  # noqa: B018


def test_experiments_export_the_default_experiment() -> None:
    """``moefast.experiments.run_methods`` (cited by ``moefast.config.load_options``) is the
    function in :mod:`moefast.experiments.methods`, imported only when first asked for."""
    import moefast.experiments
    import moefast.experiments.methods

    assert moefast.experiments.__all__ == ["run_methods"]
    assert moefast.experiments.run_methods is moefast.experiments.methods.run_methods
    with pytest.raises(AttributeError):
        moefast.experiments.no_such_name  # noqa: B018


def test_errors_are_the_classes_raised_where_they_are_raised() -> None:
    """``moefast.errors`` holds every public exception by identity: catching one from there
    catches what the module that raises it raises."""
    from moefast import errors
    from moefast.cli._options import UserError
    from moefast.data._raw import RawFormatError
    from moefast.data.table import TableError
    from moefast.runs.rundir import RunDirectoryError
    from moefast.runs.snapshot import Preempted
    from moefast.runs.writer import WriteError
    from moefast.train.loop import CapWarning, NonFiniteError
    from moefast.train.parallel.data_parallel import RankFailedError

    for cls in (UserError, RawFormatError, TableError, RunDirectoryError, Preempted, WriteError, CapWarning,
                NonFiniteError, RankFailedError):
        assert getattr(errors, cls.__name__) is cls, cls
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), Exception), name
    # Every exception class a moefast module defines publicly is listed.
    defined = set()
    for path in (ROOT / "moefast").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Warning", "Exception")) for b in node.bases
            ):
                defined.add(node.name)
    # BadInteger never reaches a user: the loader that parses a column turns it into a RawFormatError.
    assert defined - {"BadInteger"} <= set(errors.__all__), defined - set(errors.__all__)


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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The wheel ``pip wheel`` builds from this checkout, beside this environment's torch (so it
    holds the C++ tower node); built once for the layout, metadata and install tests."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
         "-Ccmake.define.MOEFAST_TOWER_OPS=ON", "-w", str(out), str(ROOT)],
        check=True,
    )
    (built,) = out.glob("moefast-*.whl")
    return built


def test_wheel_layout(wheel: pathlib.Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "moefast/kernels/__init__.py" in names and "moefast/cli/train.py" in names
    assert "moefast/__main__.py" in names
    for module in ("_C", "_tower_ops"):
        assert any(n.startswith(f"moefast/{module}.") and n.endswith(".so") for n in names), module
    assert "moefast/_tower_ops.json" in names, "the tower op's build stamp"
    assert "moefast/_C.pyi" in names and "moefast/py.typed" in names
    dist_info = f"moefast-{moefast.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"moefast", dist_info}, top_level
    # The tag says what the wheel is: CPython 3.11 on linux x86_64 (other platforms build from
    # the sdist).
    assert wheel.name.endswith(f"-cp{sys.version_info.major}{sys.version_info.minor}-linux_{platform.machine()}.whl")


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level names of what the package's modules import, beyond the stdlib and itself:
    ``{name: [files]}`` (imports inside functions included)."""
    found: dict[str, list[str]] = {}
    for folder in (ROOT / "moefast", ROOT / "kernels"):
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("moefast", "kernels", "__future__"):
                        found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_wheel_metadata_declares_what_the_package_imports(wheel: pathlib.Path) -> None:
    meta = wheel_metadata(wheel)
    assert meta["Version"] == [moefast.__version__]
    assert meta["License"] == ["MIT"]
    declared = {canonicalize_name(Requirement(r).name): Requirement(r) for r in meta["Requires-Dist"]}
    assert "torch" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    providers = importlib.metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "numpy", "pandas", "matplotlib", "tqdm", "triton"} <= set(imports), imports
    for top, files in imports.items():
        dists = {canonicalize_name(d) for d in providers.get(top, [top])}
        hits = [declared[d] for d in dists if d in declared]
        assert hits, f"{top} (imported by {files[0]}) is not in Requires-Dist"
        if top == "triton":  # only the GPU path imports it, lazily: the [gpu] extra
            assert all(h.marker is not None and "gpu" in str(h.marker) for h in hits), hits
        else:
            assert all(h.marker is None for h in hits), f"{top} is a plain dependency, not an extra: {hits}"
    assert "pyarrow" in declared and declared["pyarrow"].marker is None


def test_wheel_installs_offline_and_trains_outside_the_checkout(
    wheel: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh venv sees only what the wheel declares (see tests/_install.py), pip installs the
    wheel from it with --no-index, and a tiny ``moefast train`` runs from a folder outside the
    checkout, through the console script and ``python -m moefast``."""
    view = make_view(tmp_path / "view", runtime_closure(requires_dist(wheel)))
    python = fresh_venv(tmp_path / "venv", view)
    pip_install(python, "-q", wheel, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([python, "-c", "import moefast; print(moefast.__file__)"], cwd=elsewhere).strip()
    assert where.startswith(str(tmp_path / "venv")), where
    report = run([tmp_path / "venv" / "bin" / "moefast", "--version"], cwd=elsewhere)
    with capsys.disabled():  # which configuration the wheel got, in pytest's output
        print(f"\n[{wheel.name}] {report.strip()}")
    assert report.startswith(f"moefast {moefast.__version__}\n"), report
    assert "moefast._tower_ops (C++ tower node): loaded" in report, report
    tiny = ["--rows", "600", "--num-domains", "2", "--num-users", "60", "--num-items", "40",
            "--max-epochs", "1", "--batch-size", "256", "--quiet"]
    out = run([python, "-m", "moefast", "train", *tiny, "--method", "moe-mlora", "--out", "run"], cwd=elsewhere)
    assert "WAUC" in out, out
    metrics = json.loads((elsewhere / "run" / "metrics.json").read_text())
    assert metrics["method"] == "moe-mlora" and 0.0 <= metrics["test"]["wauc"] <= 1.0


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
