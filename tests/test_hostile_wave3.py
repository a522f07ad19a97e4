"""Hostile input to the wave-3 paths, found by a review: each case once printed a traceback, gave a
program that could not run, or took a value without a word. Through the command line where a
user meets it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _stream_data import frame, stream_schema, write_log, write_schema

from moefast import cli
from moefast.cli import _run
from moefast.cli.predict import merge_data_options
from moefast.config import FeatureSpec, TablePrecision
from moefast.nn.embedding import EmbeddingCollection

TINY = ["--preset", "paper", "--rows", "600", "--num-domains", "2", "--num-users", "40", "--num-items", "20"]

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _one_line(capsys: pytest.CaptureFixture[str], text: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moefast: error:") and text in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def half_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained with bf16 tables."""
    run = tmp_path_factory.mktemp("half-run") / "run"
    assert cli.main(["train", *TINY, "--method", "mlora", "--max-steps", "6", "--batch-size", "128",
                     "--table-precision", "bf16", "--embedding-optimizer", "lazy-adam", "--quiet",
                     "--out", str(run)]) == 0
    return run


def test_a_half_table_program_scores_as_the_run(half_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``export --table-precision bf16`` of a bf16 run: the program keeps the tables in bf16
    (recorded in its .json) and scores the test split as the merged run does. Once its lookups
    passed bf16 rows to float32 layers: every call of the program failed."""
    program = tmp_path / "half.pt2"
    assert cli.main(["export", str(half_run), "--out", str(program), "--table-precision", "bf16", "--quiet"]) == 0
    assert json.loads((tmp_path / "half.pt2.json").read_text())["table_precision"] == "bf16"
    assert cli.main(["predict", "--model", str(program), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    assert cli.main(["predict", "--model", str(half_run), "--out", str(tmp_path / "r.csv"), "--quiet"]) == 0
    got, want = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "r.csv")
    assert len(got) == len(want) > 0
    assert (got["logit"] - want["logit"]).abs().max() <= 1e-5 * max(1.0, want["logit"].abs().max())


def test_export_refuses_another_half_precision_than_the_runs(half_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 to fp16 rounds the weights again: refused, where it was once taken without a word."""
    assert cli.main(["export", str(half_run), "--out", str(tmp_path / "x.pt2"), "--table-precision", "fp16",
                     "--quiet"]) == 2
    _one_line(capsys, "--table-precision fp16: the run's tables are bf16")
    assert not (tmp_path / "x.pt2").exists()


def test_converting_tables_past_fp16s_range_is_refused_whole() -> None:
    """A weight of 1e5 (a pretrained vector, say) became inf in fp16 and training stopped later at
    a NaN loss naming neither; now the conversion is refused, naming the table, the row and the
    value, and no table is converted."""
    collection = EmbeddingCollection([FeatureSpec("user", 5, 4), FeatureSpec("item", 8, 4)])
    with torch.no_grad():
        collection.tables["item"][6, 2] = 1e5
    with pytest.raises(ValueError, match=r"table 'item' row 6 column 2 holds 100000\.0, past fp16's largest"):
        collection.set_precision(TablePrecision.FP16)
    assert all(t.dtype == torch.float32 for t in collection.tables.values())
    collection.set_precision(TablePrecision.BF16)  # bf16 has fp32's range
    assert collection.tables["item"][6, 2].item() == pytest.approx(1e5, rel=2**-8)


def test_a_streamed_column_named_twice_is_refused_in_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The in-memory reader refused it; the streamed first pass once raised a KeyError."""
    log = tmp_path / "log"
    log.mkdir()
    table = frame(200)
    doubled = pa.table([*table.columns, table.column("user")], names=[*table.column_names, "user"])
    pq.write_table(doubled, log / "part-0.parquet")
    schema = write_schema(tmp_path / "schema.toml", stream_schema())
    assert cli.main(["vocab", "--data", str(log), "--schema", str(schema), "--out", str(tmp_path / "v.json")]) == 2
    _one_line(capsys, "column 'user': named 2 times in the header")
    assert cli.main(["train", "--dataset", "table", "--data", str(log), "--schema", str(schema), "--stream",
                     "--quiet", "--out", str(tmp_path / "run")]) == 2
    _one_line(capsys, "column 'user': named 2 times in the header")


def test_a_log_not_partitioned_by_domain_is_refused_before_training(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """MoE-MLoRA's experts read one domain at a time: once refused only after the backbone stage
    had trained."""
    log = write_log(tmp_path / "log", n=300, by=("dt",))
    schema = write_schema(tmp_path / "schema.toml", stream_schema())
    base = ["train", "--dataset", "table", "--data", str(log), "--schema", str(schema), "--stream", "--quiet",
            "--max-steps", "2"]
    assert cli.main([*base, "--method", "moe-mlora", "--out", str(tmp_path / "a")]) == 2
    line = _one_line(capsys, "reading one domain's rows (MoE-MLoRA's expert stages) needs the log partitioned")
    assert "training" not in line and not (tmp_path / "a" / "checkpoints").exists()
    assert cli.main([*base, "--method", "mlora", "--batch-mode", "single-domain", "--out", str(tmp_path / "b")]) == 2
    _one_line(capsys, "(single-domain batches) needs the log partitioned")


def test_predict_changes_the_runs_data_flags_by_those_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--stream`` (or ``--data``) alone once replaced all the run's data flags: a KeyError."""
    own = {"dataset": "table", "data": "log/", "schema": "s.toml"}
    assert merge_data_options({}, own) == own
    assert merge_data_options({"stream": True}, own) == {**own, "stream": True}
    assert merge_data_options({"data": "new/"}, own) == {**own, "data": "new/"}
    assert merge_data_options({"dataset": "synthetic", "rows": 9}, own) == {"dataset": "synthetic", "rows": 9}
    assert merge_data_options({"rows": 9}, {"preset": "paper"}) == {"preset": "paper", "rows": 9}
    assert merge_data_options({"rows": 9}, None) == {"rows": 9}
    # The vocabularies beside the model serve, not the path the run once read them from.
    assert merge_data_options({"data": "new/"}, {**own, "vocab_from": "/train-host/v.json"}) == {**own, "data": "new/"}
    assert merge_data_options({}, {**own, "vocab_from": "/train-host/v.json"}) == own
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--method", "base", "--max-steps", "2", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(run), "--stream", "--out", str(tmp_path / "s.csv"), "--quiet"]) == 2
    _one_line(capsys, "--stream applies to --dataset table only")
    # A flag given alone keeps the rest of the run's own: the same fields, so it scores.
    assert cli.main(["predict", "--model", str(run), "--rows", "700", "--out", str(tmp_path / "s.csv"),
                     "--quiet"]) == 0


def test_config_files_that_cannot_be_read_or_say_a_key_twice(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    assert cli.main(["train", "--config", str(folder), "--quiet"]) == 2
    _one_line(capsys, "cannot be read: Is a directory")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'rows = 5\n\xff\n')
    assert cli.main(["train", "--config", str(binary), "--quiet"]) == 2
    _one_line(capsys, f"config file {str(binary)!r} is not UTF-8 text: byte 0xff at byte 10")
    # Two spellings of one option: TOML sees two keys, and the last once won without a word.
    twice = tmp_path / "twice.toml"
    twice.write_text('table_precision = "fp16"\ntable-precision = "bf16"\n')
    assert cli.main(["train", "--config", str(twice), "--quiet"]) == 2
    _one_line(capsys, "keys 'table_precision' and 'table-precision' set the same option: keep one")


def test_sizes_past_what_a_machine_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A row count past int64 was an OverflowError traceback; a failed allocation a MemoryError one."""
    assert cli.main(["train", "--preset", "paper", "--rows", "9" * 22, "--quiet", "--out", str(tmp_path / "r")]) == 2
    _one_line(capsys, f"synthetic knob rows must be a positive int at most 2,147,483,647, got {'9' * 22}")

    class Allocates:
        @staticmethod
        def run(args: object) -> int:
            raise MemoryError("Unable to allocate 745. GiB for an array with shape (100000000000,)")

    assert _run(Allocates, None) == 1  # type: ignore[arg-type]
    _one_line(capsys, "out of memory: Unable to allocate 745. GiB")


# --- The Python API (a second review: each case once passed silently or failed deep inside) ---


def _fused(precision: TablePrecision = TablePrecision.BF16) -> EmbeddingCollection:
    from moefast.ops.embedding import LazyAdam

    return EmbeddingCollection([FeatureSpec("a", 10, 4), FeatureSpec("b", 6, 4)], optimizer=LazyAdam(lr=0.1),
                               precision=precision, backend="reference")


def test_row_updates_are_checked_per_table() -> None:
    """Gradient blocks of the wrong widths summing to the right total once trained table b on
    two of a's gradient columns; a NaN gradient was written into the table."""
    c = _fused()
    before = {k: t.detach().clone() for k, t in c.tables.items()}
    with pytest.raises(ValueError, match=r"table 'a': grads must be float32 of shape \(2, 4\) .* got torch.float32 \(2, 6\)"):
        c.apply_row_updates({"a": (torch.tensor([1, 2]), torch.ones(2, 6)), "b": (torch.tensor([1, 2]), torch.ones(2, 2))})
    with pytest.raises(ValueError, match=r"table 'a': the gradient of row 7 is not finite; no table was updated"):
        c.apply_row_updates({"a": (torch.tensor([1, 7]), torch.tensor([[0.0] * 4, [float("nan")] * 4]))})
    with pytest.raises(ValueError, match=r"no table 'zz'; the tables are \['a', 'b'\]"):
        c.apply_row_updates({"zz": (torch.tensor([1]), torch.ones(1, 4))})
    with pytest.raises(TypeError, match=r"table 'a': rows must be a 1-D int64 tensor, got torch.int32 \(1,\)"):
        c.apply_row_updates({"a": (torch.tensor([1], dtype=torch.int32), torch.ones(1, 4))})
    with pytest.raises(ValueError, match=r"table 'b': grads must be .* shape \(0, 4\)"):
        c.apply_row_updates({"b": (torch.tensor([], dtype=torch.int64), torch.ones(5, 7))})
    assert all(torch.equal(t, before[k]) for k, t in c.tables.items())
    c.apply_row_updates({"a": (torch.tensor([1, 2]), torch.ones(2, 4))})  # a valid one still updates
    assert not torch.equal(c.tables["a"], before["a"])


def test_a_collection_is_built_within_its_precision_and_its_init() -> None:
    specs = [FeatureSpec("a", 10, 4)]
    with pytest.raises(ValueError, match=r"table 'a' row \d+ column \d+ holds .*past fp16's largest"):
        EmbeddingCollection(specs, precision=TablePrecision.FP16, init_std=1e5)
    for bad in (float("inf"), float("nan"), "0.1", True, 0):
        with pytest.raises(ValueError, match="init_std must be a finite number > 0 or None"):
            EmbeddingCollection(specs, init_std=bad)  # type: ignore[arg-type]
    c = EmbeddingCollection(specs)
    c.tables["a"] = torch.nn.Parameter(torch.zeros(10, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"the tables are torch\.float64, not one of the table precisions"):
        c.precision  # noqa: B018


def test_the_reference_backend_checks_optimizer_state_as_the_fast_one_does() -> None:
    from moefast.config import Pooling
    from moefast.ops.embedding import LazyAdam, embedding_collection

    w = [torch.randn(10, 4).bfloat16().requires_grad_()]
    good = LazyAdam().init_state(w[0])
    for slot, bad in (("exp_avg", torch.zeros(20, 4)), ("step", torch.zeros(10)), ("exp_avg", torch.zeros(10, 4).half()),
                      ("step", None)):
        state = {**good, slot: bad} if bad is not None else {k: v for k, v in good.items() if k != slot}
        with pytest.raises(TypeError, match=f"optimizer state '{slot}' must be a"):
            embedding_collection(w, [torch.tensor([5])], [None], [Pooling.NONE], optimizer=LazyAdam(),
                                 optimizer_states=[state], backend="reference")


def test_optimizer_state_loads_only_in_its_own_dtype() -> None:
    c = _fused(TablePrecision.FP32)
    state = c.state_dict()
    state["optimizer_state.a.step"] = state["optimizer_state.a.step"].float() + 0.7
    with pytest.raises(ValueError, match=r"optimizer_state.a.step is torch.float32 in the state dict but torch.int64"):
        _fused(TablePrecision.FP32).load_state_dict(state)


def test_fused_optimizers_take_numbers_only() -> None:
    from moefast.ops.embedding import LazyAdam, RowwiseAdagrad

    for kwargs in ({"lr": True}, {"beta1": False}, {"lr": "0.1"}, {"beta1": None}, {"eps": 1j}):
        with pytest.raises(TypeError, match=f"LazyAdam: {next(iter(kwargs))} must be a number"):
            LazyAdam(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="RowwiseAdagrad: lr must be a number, got 1j"):
        RowwiseAdagrad(lr=1j)  # type: ignore[arg-type]


def test_train_devices_that_cannot_train(tmp_path: Path) -> None:
    from moefast.config import TrainConfig
    from moefast.train.loop import check_device

    for bad in ("cpu:abc", "cuda:x", "cuda:"):
        with pytest.raises(ValueError, match=f"--device '{bad}': not a device"):
            TrainConfig(max_steps=2, device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device 'cuda' \(TrainConfig.device\): no CUDA device is available"):
            check_device("cuda")
    assert check_device("cpu") == torch.device("cpu")


def test_stream_must_be_a_bool(tmp_path: Path) -> None:
    import moefast.data

    log = write_log(tmp_path / "log", n=100)
    schema = write_schema(tmp_path / "schema.toml", stream_schema())
    with pytest.raises(TypeError, match="stream must be True or False, got 'false'"):
        moefast.data.load("table", path=str(log), schema=str(schema), stream="false", progress=False)


def test_export_checks_its_preprocessing_files_before_writing(tmp_path: Path) -> None:
    from moefast import models
    from moefast.config import TowerConfig
    from moefast.data import load
    from moefast.export import export_program, merge

    data = load("synthetic", preset="paper", rows=300, num_domains=2, num_users=20, num_items=10)
    merged = merge(models.build("wdl", data, "base", tower_config=TowerConfig(hidden_units=(8,))))
    src = tmp_path / "src.txt"
    src.write_text("x")
    out = tmp_path / "sub" / "p.pt2"
    for extra, message in (({"stats": tmp_path / "missing"}, "the source .* does not exist"),
                           ({"../../escaped.txt": src}, "must be a relative path inside"),
                           ({str(tmp_path / "abs.txt"): src}, "must be a relative path inside")):
        with pytest.raises(ValueError, match=message):
            export_program(merged, out, extra_files=extra)
        assert not out.exists() and not (tmp_path / "escaped.txt").exists() and not (tmp_path / "abs.txt").exists()
    with pytest.raises(TypeError, match=r"record must be a dataset\.json mapping, got list"):
        export_program(merged, out, record=[1, 2])  # type: ignore[arg-type]


def test_how_a_stream_is_read_is_checked_before_its_first_pass(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad shuffle buffer was refused only after the first pass had read the whole log."""
    import moefast.data
    import moefast.data.firstpass as firstpass

    log = write_log(tmp_path / "log", n=100)
    schema = write_schema(tmp_path / "schema.toml", stream_schema())

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the first pass ran before the options were checked")

    monkeypatch.setattr(firstpass, "first_pass", no_pass)
    with pytest.raises(ValueError, match="the shuffle buffer must be a positive number of rows, got 0"):
        moefast.data.load("table", path=str(log), schema=str(schema), stream=True, shuffle_rows=0, progress=False)


def test_predict_streams_unlabelled_data_and_reads_new_data_as_told(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Two regressions a review found in the merged data flags: a schema without a label (data
    to score) was refused by the training checks, and a streamed run's --stream was inherited by
    new data given with --data (a CSV then could not be read, and --stream cannot be unset)."""
    own = {"dataset": "table", "data": "log/", "schema": "s.toml", "stream": True, "shuffle_buffer": 10}
    assert merge_data_options({"data": "new.csv"}, own) == {"dataset": "table", "data": "new.csv", "schema": "s.toml"}
    assert merge_data_options({"read_ahead": 5}, own) == {**own, "read_ahead": 5}
    log = write_log(tmp_path / "log", n=400)
    schema = write_schema(tmp_path / "schema.toml", stream_schema())
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset", "table", "--data", str(log), "--schema", str(schema), "--stream",
                     "--method", "base", "--max-steps", "2", "--quiet", "--out", str(run)]) == 0
    unlabelled = stream_schema()
    del unlabelled["label"], unlabelled["split"]
    plain = write_schema(tmp_path / "score.toml", unlabelled)
    out = tmp_path / "scores.csv"
    assert cli.main(["predict", "--model", str(run), "--dataset", "table", "--data", str(log), "--schema", str(plain),
                     "--stream", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert len(pd.read_csv(out)) == 400
