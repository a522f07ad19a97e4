"""One module names every file of a run directory (issue 25): outside
:mod:`moefast.runs.files`, no string in ``moefast/`` is one of those names or a path ending in
one (``"metrics.json"``, ``"../vocab.json"``, the ``/metrics.json`` of an f-string). Prose that
mentions a file (docstrings, messages) is longer than the name and is not matched."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from moefast.runs import files

ROOT = Path(__file__).resolve().parents[1]
FILES = "moefast/runs/files.py"
# (file, name) -> why that string is not a run directory's file.
ALLOWED: dict[tuple[str, str], str] = {
    ("moefast/experiments/grid.py", files.DATA_REFERENCE):
        "the grid directory's data.json (DATA_FILE: a fingerprint per data setting), not a run's",
}
_NAME = re.compile(r"(?:^|/)(" + "|".join(re.escape(n) for n in files.RUN_FILES) + r")/?$")


def literals(source: str, file: str) -> list[tuple[str, int, str]]:
    """``(file, line, name)`` for each string constant in ``source`` that is, or ends in, a run
    file's name."""
    found = []
    for node in ast.walk(ast.parse(source, file)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _NAME.search(node.value)
            if match:
                found.append((file, node.lineno, match.group(1)))
    return found


def test_run_files_are_named_only_in_runs_files() -> None:
    found = []
    for path in sorted((ROOT / "moefast").rglob("*.py")):
        file = path.relative_to(ROOT).as_posix()
        if file != FILES:
            found += literals(path.read_text(), file)
    breaches = [f"{file}:{line}: {name!r}" for file, line, name in found if (file, name) not in ALLOWED]
    assert breaches == [], "name the file by its constant in moefast.runs.files:\n" + "\n".join(breaches)
    assert sorted(set(ALLOWED) - {(file, name) for file, _, name in found}) == [], "stale ALLOWED entries"


def test_the_check_sees_literals_and_path_tails_but_not_prose() -> None:
    source = ('x = run / "metrics.json"\ny = {"vocab": "../vocab.json"}\nz = f"{run}/checkpoints"\n'
              'w = "see metrics.json for the scores"\n')
    assert [(line, name) for _, line, name in literals(source, "planted.py")] == [
        (1, "metrics.json"), (2, "vocab.json"), (3, "checkpoints")]
    assert len(set(files.RUN_FILES)) == len(files.RUN_FILES)
