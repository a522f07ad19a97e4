"""Fresh, offline virtual environments that hold a moefast wheel and only what it declares.

A venv here is created with ``python -m venv`` and sees no site-packages but its own, plus one
``.pth`` line naming a *view*: a folder of symlinks to the distributions that the wheel's
``Requires-Dist`` needs, transitively, as installed in the test's own environment (torch's CPU
build included; installing a second copy would take a minute and 1 GB per venv). pip then
installs the wheel with ``--no-index``: a dependency missing from the view fails the install,
and an import the wheel does not declare fails the first run that reaches it.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def wheel_metadata(wheel: Path) -> dict[str, list[str]]:
    """The wheel's METADATA as ``{field: [values]}``."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(zf.read(name).decode())
    out: dict[str, list[str]] = {}
    for key, value in message.items():
        out.setdefault(key, []).append(value)
    return out


def runtime_closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution that ``requirements`` (no extras) need, transitively."""
    env = default_environment()
    found: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        key = canonicalize_name(req.name)
        if key in found:
            continue
        dist = md.distribution(req.name)  # PackageNotFoundError: the test env lacks a declared dependency
        found[key] = dist
        todo.extend(Requirement(r) for r in dist.requires or ())
    return found


def make_view(folder: Path, dists: dict[str, md.Distribution]) -> Path:
    """Symlinks to the top-level entries (packages, modules, .libs, .dist-info) of ``dists``."""
    folder.mkdir(parents=True, exist_ok=True)
    for dist in dists.values():
        base = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in tops:
            source, target = base / top, folder / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
    return folder


def fresh_venv(folder: Path, view: Path) -> Path:
    """A new venv whose only outside packages are ``view``; returns its python."""
    # No pip of its own (ensurepip's setuptools would shadow the view's): pip_install runs this
    # environment's pip against it.
    venv.EnvBuilder(with_pip=False, clear=True).create(folder)
    python = folder / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_moefast_view.pth").write_text(f"{view}\n")
    return python


def offline_env() -> dict[str, str]:
    """The environment of an offline pip: no index, no find-links, no cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def pip_install(python: Path, *args: str | Path, cwd: Path) -> str:
    """``pip install --no-index`` into the venv of ``python`` (this environment's pip)."""
    return run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", *args], cwd=cwd,
               env=offline_env())


def run(cmd: list[str | Path], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run ``cmd``; on failure, an AssertionError with its output."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def requires_dist(wheel: Path) -> list[str]:
    """Requires-Dist without extras."""
    return [r for r in wheel_metadata(wheel).get("Requires-Dist", []) if not re.search(r"extra\s*==", r)]


