"""The README is checked like code: every ``moefast`` command it shows parses, every ``make``
target it names exists, every link in it and in docs/ resolves (files and #anchors), and its
Python examples run, each within ``MOEFAST_DOCS_TIMEOUT`` seconds (default 300), from an empty
folder outside the checkout."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moefast import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
TIMEOUT = float(os.environ.get("MOEFAST_DOCS_TIMEOUT", "300"))


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def _commands(text: str) -> list[str]:
    """``moefast ...`` / ``python -m moefast ...`` lines of bash blocks, and inline code spans
    that start with ``moefast `` (comments dropped)."""
    found = []
    for block in _blocks(text, "bash"):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(("moefast", "python -m moefast")):
                found.append(line)
    found += [span for span in re.findall(r"`([^`\n]+)`", text) if re.fullmatch(r"moefast( [-\w.,/=~ ]+)?", span)]
    return found


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    return words[3:] if words[:3] == ["python", "-m", "moefast"] else words[1:]


def test_every_moefast_command_in_the_readme_parses(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _commands(README.read_text())
    assert len(commands) >= 8 and any(c.startswith("moefast grid") for c in commands), commands
    for command in commands:
        argv = _argv(command)
        parser = cli.build_parser()
        if {"--help", "-h", "--version"} & set(argv):
            with pytest.raises(SystemExit) as stop:
                parser.parse_args(argv)
            assert stop.value.code == 0, command
        else:
            args = parser.parse_args(argv)  # a bad flag or value exits with status 2
            assert args.command is not None or not argv, command
        capsys.readouterr()


def test_the_command_checker_rejects_a_bad_flag() -> None:
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(_argv("moefast train --no-such-flag 3"))
    assert stop.value.code == 2


def test_every_make_target_in_the_readme_exists() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", README.read_text()))
    assert {"run", "test", "check-install"} <= named, named
    assert named <= targets, named - targets


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_link_resolves(page: Path) -> None:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} does not exist"
        if anchor:
            assert anchor in _anchors(target), f"{page.name}: {link}: no heading with that anchor"


def test_the_readme_links_every_docs_page() -> None:
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README.read_text()))
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, pages - linked


def test_the_readme_stays_short() -> None:
    assert len(README.read_text().splitlines()) <= 300


@pytest.mark.parametrize("index", range(len(_blocks(README.read_text(), "python"))))
def test_python_examples_run(index: int, tmp_path: Path) -> None:
    code = _blocks(README.read_text(), "python")[index]
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the example prints its result"
