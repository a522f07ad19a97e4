"""The measurement scripts in ``tools/`` keep working as the library changes under them: each
one's ``--help`` (its imports and arguments), and the two accuracy comparisons end to end on a
tiny run. (``tools/precision_accuracy.py`` once broke silently when the claims' options moved
from epochs to steps: nothing ran it between measurements.)"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], script: str, *argv: str) -> str:
    """Run ``tools/script`` as ``__main__`` in this process with ``argv``; its standard output."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(str(TOOLS / script), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (None, 0), capsys.readouterr()
    return capsys.readouterr().out


@pytest.mark.parametrize("script", ["precision_accuracy.py", "compare_table_precision.py", "profile_bf16_step.py",
                                    "claims_pilot.py", "profile_half_update.py"])
def test_a_tool_starts(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], script: str) -> None:
    assert "usage" in _run(monkeypatch, capsys, script, "--help")


def test_the_bf16_accuracy_comparison_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(monkeypatch, capsys, "precision_accuracy.py", "--seeds", "2", "--rows", "2000", "--max-steps", "1")
    assert "mlora: WAUC bf16-mixed - fp32 =" in out and "moe-specialist: WAUC bf16-mixed - fp32 =" in out, out


def test_the_half_table_accuracy_comparison_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    out = _run(monkeypatch, capsys, "compare_table_precision.py", "--seeds", "2", "--rows", "2000",
               "--max-epochs", "1")
    assert "bf16 - fp32 WAUC =" in out and "over 2 paired seeds" in out, out
    # Both half types against one fp32 run per seed, on a third seed, joined to the first two.
    known = tmp_path / "known.txt"
    known.write_text(out)
    more = _run(monkeypatch, capsys, "compare_table_precision.py", "--precision", "bf16,fp16", "--seeds", "1",
                "--first-seed", "3", "--known", str(known), "--rows", "2000", "--max-epochs", "1")
    assert "seed 3: fp32" in more and "fp16 - fp32 WAUC" not in more, more  # fp16: one seed, no interval
    assert "bf16 - fp32 WAUC =" in more and "over 3 paired seeds" in more, more


def test_the_half_table_step_profile_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("moefast._C")
    out = _run(monkeypatch, capsys, "profile_half_update.py", "--precision", "fp16", "--workload", "d16",
               "--max-rows", "20000", "--steps", "2", "--threads", "1")
    assert "d16 fp16 rowwise-adagrad:" in out and "ms per step" in out, out
