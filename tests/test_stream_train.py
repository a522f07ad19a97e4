"""Training on a streamed log (issue 26): ``models.build``, ``fit`` and the run directory take a
:class:`moefast.data.stream.StreamedDataset`; with a shuffle buffer as large as the data and the
stored row order a streamed run equals the in-memory run bit for bit; a streamed run killed
mid-epoch (a window and a buffer smaller than the data) resumes bitwise; the shuffle buffer is
recorded and a resume with another is refused."""

from __future__ import annotations

import json
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _resume_run as tiny
import pandas as pd
import pytest
import torch
from _stream_data import stream_schema, write_log

import moefast
from moefast import models
from moefast.config import EmbeddingOptimizer, TowerConfig, TrainConfig
from moefast.data import firstpass, stream
from moefast.runs import rundir
from moefast.runs.checkpoint import read_checkpoint
from moefast.train import fit
from moefast.train.errors import CapWarning

TOWER = TowerConfig(hidden_units=(16, 8), ranks=(2, 1))


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stream-train")
    folder = write_log(root / "log", n=900)
    vocab = root / "vocab.json"
    vocab.write_text(json.dumps(firstpass.first_pass(folder, stream_schema(), progress=False)))
    return folder, vocab


def _config(**changes: Any) -> TrainConfig:
    options: dict[str, Any] = {"max_epochs": 2, "patience": 2, "batch_size": 64, "eval_every": 4,
                               "progress": False, "embedding_optimizer": EmbeddingOptimizer.LAZY_ADAM}
    return TrainConfig(**(options | changes))


def _train(ds: Any, out: Path | None, *, resume: bool = False, **changes: Any) -> Any:
    model = models.build("deepfm", ds, "moe-mlora", tower_config=TOWER, seed=5)
    with warnings.catch_warnings():  # the stages end at their cap here (CapWarning): not what is tested
        warnings.simplefilter("ignore", CapWarning)
        return fit(model, ds, _config(**changes), backend="fast", out_dir=out, resume=resume), model


def test_a_buffer_holding_everything_trains_bitwise_as_the_in_memory_source(
        log: tuple[Path, Path], tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, vocab = log
    mem = moefast.data.load("table", path=folder, schema=stream_schema(), vocab_from=vocab, use_cache=False,
                            progress=False)
    whole = stream.open_stream(folder, stream_schema(), vocab, shuffle_rows=10**6, fragment_order="stored")
    # The streamed predictions file is written as the test split is scored: each batch reaches
    # the file right after the loader built it (not from the gathered scores after the last).
    built, written = [0], []
    real_batch, real_write = stream._batch, rundir.write_batches

    def counted(enc: Any) -> Any:
        built[0] += 1
        return real_batch(enc)

    def watched(path: Path, batches: Any) -> Path:
        def each() -> Iterator[Any]:
            for b in batches:
                written.append((b.num_rows, built[0]))
                yield b
        return real_write(path, each())

    monkeypatch.setattr(stream, "_batch", counted)
    monkeypatch.setattr(rundir, "write_batches", watched)
    (ours, model_s), (theirs, model_m) = (_train(whole, tmp_path / "s", eval_batch_size=64),
                                          _train(mem, tmp_path / "m", eval_batch_size=64))
    assert [n for n, _ in written] == [min(64, len(whole.test) - s) for s in range(0, len(whole.test), 64)]
    assert [b for _, b in written] == list(range(written[0][1], written[0][1] + len(written)))
    assert [r.label for r in ours.stages] == ["backbone", "expert_0", "expert_1", "expert_2", "gate"]
    for a, b in zip(ours.stages, theirs.stages, strict=True):
        assert a.losses == b.losses and a.val_history == b.val_history, a.label
    assert ours.metrics["test"] == theirs.metrics["test"]
    state = model_m.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model_s.state_dict().items())
    # The test predictions: Parquet for the stream, the same values as the in-memory CSV.
    streamed = pd.read_parquet(tmp_path / "s" / "predictions.parquet")
    memory = pd.read_csv(tmp_path / "m" / "predictions.csv")
    assert list(streamed.columns) == list(memory.columns) == ["domain", "label", "score"]
    assert (streamed["domain"].to_numpy() == memory["domain"].to_numpy()).all()
    assert (streamed["score"].to_numpy() == memory["score"].to_numpy()).all()
    # The control: a buffer smaller than the data trains on other batches.
    small = stream.open_stream(folder, stream_schema(), vocab, shuffle_rows=100, fragment_order="stored")
    other, _ = _train(small, None, max_epochs=1)
    assert other.stages[0].losses[1:] != ours.stages[0].losses[1:len(other.stages[0].losses)]


_in_child = tiny.in_child


def test_a_killed_streamed_run_resumes_bitwise(log: tuple[Path, Path], tmp_path: Path, one_thread: None) -> None:
    folder, vocab = log
    # A window of 4 KiB and a buffer of 100 rows, both far smaller than the 540 training rows.
    def opened() -> stream.StreamedDataset:
        return stream.open_stream(folder, stream_schema(), vocab, shuffle_rows=100, read_ahead=4096)

    whole, _ = _train(opened(), tmp_path / "whole", eval_every=None)
    run = tmp_path / "run"
    # Killed in the backbone's second epoch, after its third step; then in an expert's first.
    status = _in_child(lambda: _train(opened(), run, eval_every=None), "kill:step:0:2:3")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    status = _in_child(lambda: _train(opened(), run, resume=True, eval_every=None), "kill:step:2:1:1")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    resumed, _ = _train(opened(), run, resume=True, eval_every=None)
    for a, b in zip(resumed.stages, whole.stages, strict=True):
        assert a.losses == b.losses, a.label
    assert resumed.metrics["test"] == whole.metrics["test"]
    assert (run / "predictions.parquet").read_bytes() == (tmp_path / "whole" / "predictions.parquet").read_bytes()
    for name in sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()):
        mine, theirs = read_checkpoint(run / "checkpoints" / name), read_checkpoint(tmp_path / "whole" / "checkpoints" / name)
        assert all(torch.equal(mine["state_dict"][k], v) for k, v in theirs["state_dict"].items()), name
    # The shuffle buffer changes results: recorded, and a resume with another is refused.
    settings = json.loads((run / "settings.json").read_text())
    assert settings["dataset"]["shuffle_rows"] == 100 and settings["dataset"]["shards"] == 1
    other = stream.open_stream(folder, stream_schema(), vocab, shuffle_rows=200, read_ahead=4096)
    with pytest.raises(ValueError, match=r"other settings \(dataset\.shuffle_rows"):
        _train(other, run, resume=True, eval_every=None)
    # The window does not: another one resumes.
    again = stream.open_stream(folder, stream_schema(), vocab, shuffle_rows=100, read_ahead=0)
    assert _train(again, run, resume=True, eval_every=None)[0].metrics["test"] == whole.metrics["test"]
