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
from moefast.nn.embedding import EmbeddingCollection
from moefast.reference.embedding_optim import LazyAdam
from moefast.train import load_checkpoint, save_checkpoint
from moefast.train.loop import CapWarning

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


# --- Checkpoints that store what a stage changed (issue 25) ------------------------------------


@pytest.fixture(scope="module")
def tiny() -> MultiDomainDataset:
    return data.load("synthetic", preset="paper", rows=600, num_domains=3, num_users=80, num_items=40)


@pytest.fixture(scope="module")
def staged_run(tiny: MultiDomainDataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CTRModel]:
    """A MoE-MLoRA run (backbone, one stage per expert, gate) with a fused embedding optimizer
    (its state is buffers), and its model as trained."""
    from moefast.config import EmbeddingOptimizer, TrainConfig
    from moefast.train import fit

    out = tmp_path_factory.mktemp("staged") / "run"
    model = models.build("deepfm", tiny, "moe-mlora", tower_config=SMALL, seed=1)
    config = TrainConfig(max_epochs=1, batch_size=64, progress=False, eval_every=None,
                         embedding_optimizer=EmbeddingOptimizer.LAZY_ADAM)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small shapes: a second thread only costs on a loaded machine
    try:
        with torch.random.fork_rng(), pytest.warns(CapWarning):
            fit(model, tiny, config, backend="reference", out_dir=out)
    finally:
        torch.set_num_threads(threads)
    return out, model


def _stages(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("*.pt"))


def test_a_stage_checkpoint_holds_only_what_the_stage_trained(staged_run: tuple[Path, CTRModel]) -> None:
    from moefast.runs.checkpoint import CHECKPOINT_FORMAT, DELTA_FORMAT, file_sha256

    run, model = staged_run
    first, *later = _stages(run)
    full = torch.load(first, weights_only=True)
    assert full["format"] == CHECKPOINT_FORMAT and full["state_dict"].keys() == model.state_dict().keys()
    tower = {name for name, _ in model.tower.named_parameters(prefix="tower")}
    for previous, path in zip([first, *later], later, strict=False):
        delta = torch.load(path, weights_only=True)
        assert delta["format"] == DELTA_FORMAT
        assert delta["base"] == {"path": previous.name, "sha256": file_sha256(previous)}
        keys = set(delta["state_dict"])
        # The experts' and the gate's stages train tower tensors only: no table, no table state.
        assert keys and keys <= tower, sorted(keys - tower)
        if delta["stage"] == "gate":
            assert keys == {n for n in tower if n.startswith("tower.gate.")}
        else:
            assert all(".lora_" in n for n in keys), sorted(keys)
    sizes = [p.stat().st_size for p in _stages(run)]
    assert max(sizes[1:]) < sizes[0] / 4, sizes


def test_reassembly_is_bitwise_the_full_state(staged_run: tuple[Path, CTRModel], tiny: MultiDomainDataset) -> None:
    from moefast.runs.checkpoint import read_checkpoint

    run, model = staged_run
    last = _stages(run)[-1]
    state = read_checkpoint(last)["state_dict"]
    assert state.keys() == model.state_dict().keys()
    assert any(".optimizer_state." in k for k in state)  # the fused optimizer's buffers are there
    for key, tensor in model.state_dict().items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    target = models.build("deepfm", tiny, "moe-mlora", tower_config=SMALL, seed=2)
    for module in target.modules():  # the trained model's fused optimizer state (buffers) too
        if isinstance(module, EmbeddingCollection):
            module.set_optimizer(LazyAdam())
    assert load_checkpoint(last, target, expected_stage="gate")["stage"] == "gate"
    for key, tensor in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key


@pytest.mark.parametrize("damage", [_flip_middle, _truncate, "replaced", "missing"],
                         ids=["bytes-flipped", "truncated", "replaced", "missing"])
def test_a_damaged_or_replaced_base_is_refused(
    staged_run: tuple[Path, CTRModel], tiny: MultiDomainDataset, tmp_path: Path, damage: Callable[[Path], None] | str
) -> None:
    import shutil

    run, _ = staged_run
    copy = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", copy)
    first, *_rest, last = sorted(copy.glob("*.pt"))
    if damage == "replaced":  # a full checkpoint of other weights, whole and readable
        save_checkpoint(first, models.build("deepfm", tiny, "moe-mlora", tower_config=SMALL, seed=3), "backbone")
    elif damage == "missing":
        first.unlink()
    else:
        assert callable(damage)
        damage(first)
    target = models.build("deepfm", tiny, "moe-mlora", tower_config=SMALL, seed=2)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=rf"checkpoint '[^']*{first.name}'.*(base|does not exist)") as info:
        load_checkpoint(last, target)
    assert type(info.value) is ValueError
    _assert_untouched(target, before)


def test_an_old_run_of_full_checkpoints_still_loads_and_exports(
    staged_run: tuple[Path, CTRModel], tmp_path: Path
) -> None:
    import shutil

    from moefast.export import load_run, merge
    from moefast.runs.checkpoint import CHECKPOINT_FORMAT, read_checkpoint

    run, model = staged_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    # Written as moefast did before issue 25: every stage a full checkpoint of format 1.
    payloads = {path: read_checkpoint(path) for path in _stages(old)}  # all read before any is rewritten
    for path, payload in payloads.items():
        torch.save({"format": CHECKPOINT_FORMAT, "stage": payload["stage"], "meta": payload["meta"],
                    "state_dict": payload["state_dict"]}, path)
    loaded = load_run(old, backend="reference")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    assert merge(loaded.model) is not None


def test_an_old_run_recorded_in_config_json_still_loads(staged_run: tuple[Path, CTRModel], tmp_path: Path) -> None:
    """settings.json is the one record of how a run started (issue 25); a run directory written
    before it held the model (its config.json did) loads as before."""
    import json
    import shutil

    from moefast.export import load_run

    run, model = staged_run
    assert not (run / "config.json").exists()
    old = tmp_path / "old"
    shutil.copytree(run, old)
    settings = json.loads((old / "settings.json").read_text())
    recorded = settings.pop("model")
    (old / "settings.json").write_text(json.dumps(settings))
    (old / "config.json").write_text(json.dumps({"dataset": settings["dataset"]["name"], "model": recorded["name"],
                                                 "tower": recorded["tower"], "num_domains": model.num_domains,
                                                 "train": settings["train"]}))
    loaded = load_run(old, backend="reference")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
