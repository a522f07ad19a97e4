"""load_checkpoint validates before it writes: a damaged, empty or mismatched file is a
``ValueError`` naming it, and the model is untouched after a refused load (issue 15)."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moefast import data, models
from moefast.config import TowerConfig
from moefast.data.dataset import MultiDomainDataset
from moefast.models.base import CTRModel
from moefast.train import load_checkpoint, save_checkpoint

SMALL = TowerConfig(hidden_units=(16, 8), ranks=(2, 1))


@pytest.fixture(scope="module")
def ds() -> MultiDomainDataset:
    return data.load("synthetic", preset="paper", rows=600, num_domains=3)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor) and after[key].dtype == tensor.dtype, key


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x80\x04not a checkpoint at all" * 10)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _pickle_only(path: Path) -> None:
    path.write_bytes(pickle.dumps({"format": 1}))


def _zip_without_data(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")  # a dict missing every key


@pytest.mark.parametrize(
    "damage", [_truncate, _garbage, _empty, _flip_middle, _pickle_only, _zip_without_data],
    ids=["truncated", "garbage", "empty", "bytes-flipped", "plain-pickle", "keys-missing"],
)
def test_damaged_file_is_a_value_error_naming_it(
    ds: MultiDomainDataset, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    source = models.build("deepfm", ds, "mlora", tower_config=SMALL, seed=1)
    path = save_checkpoint(tmp_path / "c.pt", source, "joint", {"model": "deepfm", "tower": "mlora"})
    damage(path)
    target = models.build("deepfm", ds, "mlora", tower_config=SMALL, seed=2)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"c\.pt") as info:
        load_checkpoint(path, target)
    assert type(info.value) is ValueError
    _assert_untouched(target, before)


def _edit_state(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload["state_dict"])
    torch.save(payload, path)


def _last_key(state: dict[str, torch.Tensor]) -> str:
    return list(state)[-1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop(_last_key(s)), "missing 1 key"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "unexpected key"),
        (lambda s: s.__setitem__(_last_key(s), torch.zeros(7, 3)), "has shape"),
        (lambda s: s.__setitem__(_last_key(s), s[_last_key(s)].double()), "has dtype"),
    ],
    ids=["key-missing", "key-extra", "shape", "dtype"],
)
def test_mismatched_tensors_are_refused_before_any_write(
    ds: MultiDomainDataset, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None], message: str
) -> None:
    # The first keys still match: a load that copied key by key would have written them.
    source = models.build("deepfm", ds, "mlora", tower_config=SMALL, seed=1)
    path = save_checkpoint(tmp_path / "c.pt", source, "joint")
    _edit_state(path, edit)
    target = models.build("deepfm", ds, "mlora", tower_config=SMALL, seed=2)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=rf"c\.pt.*does not match the model.*{message}"):
        load_checkpoint(path, target)
    _assert_untouched(target, before)


def test_recorded_model_and_tower_are_compared(ds: MultiDomainDataset, tmp_path: Path) -> None:
    source: CTRModel = models.build("deepfm", ds, "mlora", tower_config=SMALL, seed=1)
    target: CTRModel = models.build("deepfm", ds, "mlora", tower_config=SMALL, seed=2)
    before = _snapshot(target)
    # Same tensors, another recorded identity: refused by the metadata alone.
    for meta, what in (({"model": "dcn", "tower": "mlora"}, "model 'dcn'"),
                       ({"model": "deepfm", "tower": "moe-mlora"}, "tower 'moe-mlora'")):
        path = save_checkpoint(tmp_path / "c.pt", source, "joint", meta)
        with pytest.raises(ValueError, match=rf"c\.pt.*saved from {what}"):
            load_checkpoint(path, target)
        _assert_untouched(target, before)
    path = save_checkpoint(tmp_path / "ok.pt", source, "joint", {"model": source.name, "tower": "mlora"})
    assert load_checkpoint(path, target)["model"] == "deepfm"
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key


def test_recorded_dataset_is_compared_when_the_caller_names_one(ds: MultiDomainDataset, tmp_path: Path) -> None:
    source: CTRModel = models.build("deepfm", ds, "mlora", tower_config=SMALL, seed=1)
    target: CTRModel = models.build("deepfm", ds, "mlora", tower_config=SMALL, seed=2)
    before = _snapshot(target)
    path = save_checkpoint(tmp_path / "c.pt", source, "joint", {"model": "deepfm", "dataset": "movielens-1m"})
    with pytest.raises(ValueError, match=r"c\.pt.*saved from dataset 'movielens-1m' \(the dataset: 'other'\)"):
        load_checkpoint(path, target, dataset="other")
    _assert_untouched(target, before)
    assert load_checkpoint(path, target, dataset="movielens-1m")["dataset"] == "movielens-1m"
    assert load_checkpoint(path, target)["stage"] == "joint"  # no dataset named: not compared
