"""The one way to extend the resume snapshot (issue 25): ``extend_snapshot`` under a name of the
extension's own, read back by ``snapshot_extension``; any other top-level key is refused, and a
snapshot written before extensions existed reads as "none"."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from moefast.runs.snapshot import (
    SNAPSHOT_KEYS,
    extend_snapshot,
    load_snapshot,
    save_snapshot,
    snapshot_extension,
)

PRE_25D_RUN = Path(__file__).parent / "data" / "pre-25d-run"


def _core() -> dict:
    return {"records": [], "rng": {"torch": torch.get_rng_state()}, "stage": None, "settings_sha256": None,
            "world_size": 1}


def test_an_extension_round_trips_and_an_older_snapshot_has_none(tmp_path: Path) -> None:
    payload = _core()
    extend_snapshot(payload, "loader", {"position": 17, "buffer": torch.arange(4)})
    save_snapshot(tmp_path, payload)
    state = snapshot_extension(load_snapshot(tmp_path) or {}, "loader")
    assert state["position"] == 17 and torch.equal(state["buffer"], torch.arange(4))
    assert snapshot_extension(load_snapshot(tmp_path) or {}, "precision") is None
    old = tmp_path / "old"
    shutil.copytree(PRE_25D_RUN, old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # recorded at one thread: warned about here, not refused
        snapshot = load_snapshot(old)
    assert snapshot is not None and set(snapshot) - {"format", "moefast", "torch", "threads"} <= SNAPSHOT_KEYS
    assert snapshot_extension(snapshot, "loader") is None


def test_a_key_outside_the_loops_core_or_a_name_given_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['loader'\] are not the loop's: add them with extend_snapshot"):
        save_snapshot(tmp_path, {**_core(), "loader": 1})
    payload = _core()
    extend_snapshot(payload, "loader", 1)
    with pytest.raises(ValueError, match="extension 'loader' is given twice"):
        extend_snapshot(payload, "loader", 2)

