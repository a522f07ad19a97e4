"""Installing moefast the way its users do, with pip's default build isolation (``make
check-install``, a few minutes; not part of ``make test``).

Isolated builds cannot see torch, so what they make has the embedding engine ``moefast._C`` and
no C++ tower node: the tower runs as the Python node, and the tower tests run here against such
an install (``make test`` runs them against the C++ node). Build requirements (scikit-build-core,
nanobind) come from the package index pip is configured with; every install of a built wheel is
offline (``--no-index``) into a fresh venv that sees only what the wheel declares (see
tests/_install.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from _install import fresh_venv, make_view, pip_install, requires_dist, run, runtime_closure

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--rows", "600", "--num-domains", "2", "--num-users", "60", "--num-items", "40",
        "--max-epochs", "1", "--batch-size", "256", "--quiet"]
NOT_BUILT = "moefast._tower_ops (C++ tower node): not used, the Python node runs: moefast._tower_ops is not built"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's files as git sees them (tracked, and untracked but not ignored): no build
    folder, no .venv, like a fresh clone of this working tree."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    out = tmp_path_factory.mktemp("source") / "moefast"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, out / name)
    return out


@pytest.fixture(scope="module")
def dist(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """``python -m build``: the sdist, then the wheel built from it, both isolated."""
    out = tmp_path_factory.mktemp("dist")
    log = run([sys.executable, "-m", "build", "--outdir", out, source], cwd=source)
    (sdist,) = out.glob("moefast-*.tar.gz")
    (wheel,) = out.glob("moefast-*.whl")
    return sdist, wheel, log


@pytest.fixture(scope="module")
def installed(dist: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the isolated wheel (and pytest, to run the tower tests in it)."""
    _, wheel, _ = dist
    tmp = tmp_path_factory.mktemp("installed")
    view = make_view(tmp / "view", runtime_closure([*requires_dist(wheel), "pytest"]))
    python = fresh_venv(tmp / "venv", view)
    pip_install(python, "-q", wheel, cwd=tmp)
    return python


def test_build_makes_an_sdist_and_a_wheel(dist: tuple[Path, Path, str]) -> None:
    sdist, wheel, log = dist
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("CMakeLists.txt", "pyproject.toml", "LICENSE", "README.md", "csrc/ops/tower.cpp",
                   "csrc/bindings.cpp", "kernels/__init__.py", "moefast/cli/__init__.py", "moefast/_C.pyi"):
        assert needed in names, needed
    assert not any(n.startswith(("build/", ".venv/", "runs/")) for n in names)
    wheel_names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("moefast/_C.") and n.endswith(".so") for n in wheel_names)
    # Isolated: no torch at build time, so no tower op (and a notice in the build log).
    assert not any(n.startswith("moefast/_tower_ops") for n in wheel_names), wheel_names
    assert "moefast._tower_ops is not built" in log, log[-3000:]
    assert wheel.name.endswith("-linux_x86_64.whl") or not sys.platform.startswith("linux")


def test_isolated_wheel_installs_offline_and_trains_outside_the_checkout(
    installed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run([installed.parent / "moefast", "--version"], cwd=tmp_path)
    with capsys.disabled():  # the configuration this wheel got, in pytest's output
        print(f"\n[isolated wheel] {report.strip()}")
    assert "moefast._C (embedding engine): loaded" in report and NOT_BUILT in report, report
    out = run([installed, "-m", "moefast", "train", *TINY, "--out", "run"], cwd=tmp_path)
    assert "WAUC" in out and "TowerOpWarning" in out, out  # the fallback says so
    metrics = json.loads((tmp_path / "run" / "moe-mlora" / "metrics.json").read_text())
    assert metrics["backend"] and 0.0 <= metrics["test"]["wauc"] <= 1.0


def test_tower_tests_pass_on_the_python_node(installed: Path, tmp_path: Path) -> None:
    """tests/test_tower_cpu.py against the isolated install: the C++-node tests skip, every
    other one (the fused tower against the per-layer path, bad input) runs on the Python node."""
    for name in ("conftest.py", "test_tower_cpu.py"):
        shutil.copy2(ROOT / "tests" / name, tmp_path / name)
    out = run([installed, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "test_tower_cpu.py"], cwd=tmp_path)
    assert " passed" in out and "moefast._tower_ops not built" in out, out[-3000:]
    assert " failed" not in out and " error" not in out, out[-3000:]


def test_pip_wheel_dot(source: Path, tmp_path: Path) -> None:
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path, source], cwd=source)
    (wheel,) = tmp_path.glob("moefast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("moefast/_C.") for n in names) and not any("_tower_ops" in n for n in names)


def _user_venv(dist: tuple[Path, Path, str], tmp_path: Path) -> Path:
    """A fresh venv with torch (the CPU build) and the runtime dependencies, as a user has."""
    return fresh_venv(tmp_path / "venv", make_view(tmp_path / "view", runtime_closure(requires_dist(dist[1]))))


def test_pip_install_dot(source: Path, dist: tuple[Path, Path, str], tmp_path: Path) -> None:
    python = _user_venv(dist, tmp_path)
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", source], cwd=tmp_path)
    report = run([python, "-m", "moefast", "--version"], cwd=tmp_path)
    assert "moefast._C (embedding engine): loaded" in report and NOT_BUILT in report, report


def test_pip_install_editable(source: Path, dist: tuple[Path, Path, str], tmp_path: Path) -> None:
    """``pip install -e .``: Python files come from the source folder."""
    python = _user_venv(dist, tmp_path)
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "-e", source], cwd=tmp_path)
    where = run([python, "-c", "import moefast, moefast._C; print(moefast.__file__)"], cwd=tmp_path).strip()
    assert where == str(source / "moefast" / "__init__.py"), where
    out = run([python, "-m", "moefast", "train", *TINY, "--method", "base", "--out", "run"], cwd=tmp_path)
    assert "WAUC" in out, out
