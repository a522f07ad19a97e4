"""The one way to extend the resume snapshot (issue 25): a part registered with
``register_snapshot_part`` is saved in every snapshot and handed its state on resume, through a
real ``fit`` killed and resumed; underneath, ``extend_snapshot`` under a name of the extension's
own, read back by ``snapshot_extension``; any other top-level key is refused, and a snapshot
written before extensions existed reads as "none"."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any

import _resume_run as tiny
import pytest
import torch
from test_models import tiny_dataset

from moefast import models
from moefast.config import TowerConfig, TrainConfig
from moefast.runs.snapshot import (
    SNAPSHOT_KEYS,
    extend_snapshot,
    load_snapshot,
    register_snapshot_part,
    save_snapshot,
    snapshot_extension,
)
from moefast.train import loop

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


TOWER = TowerConfig(hidden_units=(8, 4), ranks=(2, 1), dropout=0.0)
# 64 training rows in batches of 16: a validation (and a snapshot) every 3 steps, 11 steps in all.
CONFIG = dataclasses.replace(TrainConfig(max_epochs=3, patience=5, batch_size=16, progress=False),
                             eval_every=3, max_steps=11, max_epochs=None)


class _Counter:
    """A part of a run outside the loop: its state is the number of snapshots it has been asked for."""

    def __init__(self) -> None:
        self.count = 0
        self.restored: list[Any] = []

    def get_state(self) -> dict[str, Any]:
        self.count += 1
        return {"count": self.count, "tensor": torch.full((2,), float(self.count))}

    def set_state(self, state: Any) -> None:
        self.restored.append(state)
        if state is not None:
            self.count = state["count"]


# The tiny run ends at its step cap while still improving, on purpose (a short run).
@pytest.mark.filterwarnings("ignore::moefast.train.errors.CapWarning")
def test_a_registered_part_is_saved_and_restored_through_a_killed_and_resumed_fit(tmp_path: Path) -> None:
    ds = tiny_dataset()
    whole = loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, CONFIG, out_dir=tmp_path / "whole")

    counter = _Counter()
    unregister = register_snapshot_part("counter", counter.get_state, counter.set_state)
    try:
        with pytest.raises(ValueError, match="a snapshot part named 'counter' is already registered"):
            register_snapshot_part("counter", counter.get_state, counter.set_state)
        # Killed right after the second snapshot, that of step 6's validation.
        with tiny.stopping_after_snapshot(2), pytest.raises(tiny.StoppedAfterSnapshot):
            loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, CONFIG, out_dir=tmp_path / "cut")
        # Saving included the part's state: the second snapshot's.
        saved = snapshot_extension(load_snapshot(tmp_path / "cut") or {}, "counter")
        assert saved is not None and saved["count"] == 2 and torch.equal(saved["tensor"], torch.full((2,), 2.0))

        # The resuming process: a fresh part, and one registered since the snapshot was written.
        counter.count = 0
        late = _Counter()
        unregister_late = register_snapshot_part("late", late.get_state, late.set_state)
        try:
            resumed = loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, CONFIG,
                               out_dir=tmp_path / "cut", resume=True)
        finally:
            unregister_late()
        assert [r["count"] for r in counter.restored] == [2]  # handed its saved state, once
        assert late.restored == [None]  # none saved: the part decides what that means
        assert counter.count > 2  # it carried on counting from its saved state
        final = load_snapshot(tmp_path / "cut") or {}
        assert snapshot_extension(final, "counter")["count"] == counter.count
        assert snapshot_extension(final, "late") is not None
        # The part changes nothing of the run: bitwise the uninterrupted one.
        assert resumed.stages[0].losses == whole.stages[0].losses
        assert torch.equal(resumed.test_logits, whole.test_logits)
    finally:
        unregister()

    # A snapshot holding a part this process has not registered is refused, before anything runs.
    with pytest.raises(ValueError, match=r"resume\.pt' holds the state of snapshot part\(s\) \['counter', 'late'\], "
                                         r"which this process has not registered"):
        loop.fit(models.build("deepfm", ds, "base", tower_config=TOWER), ds, CONFIG, out_dir=tmp_path / "cut",
                 resume=True)
