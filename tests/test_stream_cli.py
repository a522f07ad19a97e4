"""``moefast train --stream`` and ``moefast predict`` of a streamed log (issue 26): the first pass,
training, the run directory, a resume, scores written as Parquet or CSV with their keys; the one-line refusals (CSV, a
random split, the stream's options without --stream, another --shuffle-buffer on --resume, the
grid)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from _stream_data import stream_schema, write_log, write_schema

from moefast import cli
from moefast.config import DataConfig
from moefast.experiments.grid import GridConfig


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moefast: error")]
    assert len(err) == 1, err
    return err[0]


def test_train_stream_then_resume_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write_log(tmp_path / "log", n=600)
    schema = write_schema(tmp_path / "schema.toml", stream_schema())
    vocab = tmp_path / "vocab.json"
    assert cli.main(["vocab", "--data", str(log), "--schema", str(schema), "--out", str(vocab), "--quiet"]) == 0
    run = tmp_path / "run"
    flags = ["train", "--dataset", "table", "--data", str(log), "--schema", str(schema), "--stream",
             "--vocab-from", str(vocab), "--shuffle-buffer", "200", "--read-ahead", "64K", "--method", "mlora",
             "--max-epochs", "1", "--batch-size", "64", "--quiet", "--out", str(run)]
    assert cli.main(flags) == 0
    scores = pd.read_parquet(run / "predictions.parquet")
    assert len(scores) > 0 and list(scores.columns) == ["domain", "label", "score"]
    assert "shuffle_buffer = 200" in (run / "config.toml").read_text()
    capsys.readouterr()
    # A resume: another read-ahead window is fine, another shuffle buffer is refused in one line.
    assert cli.main(["train", "--resume", str(run), "--read-ahead", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--shuffle-buffer", "300", "--quiet"]) == 2
    assert "shuffle_buffer" in _one_line(capsys)
    # predict over the stream: scores of the test split in stored order, as the run's own, with
    # the schema's key column, as Parquet or CSV.
    out = tmp_path / "scores.parquet"
    assert cli.main(["predict", "--model", str(run), "--out", str(out), "--unmerged", "--quiet"]) == 0
    mine = pq.read_table(out).to_pandas()
    assert list(mine.columns) == ["row", "key", "domain", "domain_name", "label", "logit", "score"]
    assert (mine["score"].to_numpy() == scores["score"].to_numpy()).all()
    assert cli.main(["predict", "--model", str(run), "--out", str(tmp_path / "s.csv"), "--unmerged", "--batch-size",
                     "50", "--quiet"]) == 0
    # Written 50 rows at a time, the file the in-memory predict's writer makes of the same columns
    # in one frame (pandas' CSV of the whole table), byte for byte.
    assert cli.main(["predict", "--model", str(run), "--out", str(tmp_path / "s.parquet"), "--unmerged",
                     "--batch-size", "50", "--quiet"]) == 0
    text = (tmp_path / "s.csv").read_text()
    assert text == pd.read_parquet(tmp_path / "s.parquet").to_csv(index=False)
    assert text.count("\n") == len(mine) + 1 > 51
    assert mine["key"].str.fullmatch(r"r\d+").all()


def test_streamed_options_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write_log(tmp_path / "log", n=200)
    schema = write_schema(tmp_path / "schema.toml", stream_schema())
    csv = tmp_path / "log.csv"
    pq.read_table(log).to_pandas().to_csv(csv, index=False)
    base = ["train", "--dataset", "table", "--schema", str(schema), "--quiet", "--out", str(tmp_path / "r")]
    assert cli.main([*base, "--data", str(csv), "--stream"]) == 2
    assert "is CSV: a streamed source reads Parquet" in _one_line(capsys)
    assert cli.main([*base, "--data", str(log), "--shuffle-buffer", "10"]) == 2
    assert "--shuffle-buffer applies to a streamed table (--stream) only" in _one_line(capsys)
    random = write_schema(tmp_path / "random.toml", stream_schema({"kind": "random"}))
    assert cli.main([*base[:3], "--schema", str(random), "--data", str(log), "--stream", "--quiet"]) == 2
    assert "'hash'" in _one_line(capsys)
    with pytest.raises(SystemExit):
        cli.main(["grid", "--stream"])
    assert "unrecognized arguments: --stream" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--stream"])
    assert "unrecognized arguments: --stream" in capsys.readouterr().err
    with pytest.raises(ValueError, match="streamed table"):
        GridConfig(data=(DataConfig(dataset="table", data=str(log), schema=str(schema), stream=True),))
