"""The streamed source (issue 26): parity with the in-memory loader when the buffer holds
everything, resume by replay and skip, disjoint shards per rank, domain pruning, the
fingerprint checked at open."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _stream_data import stream_schema, write_log

import moefast
from moefast.data import firstpass, stream
from moefast.data import table as table_mod
from moefast.data.batching import BatchLoader, BatchOrder
from moefast.data.table import TableError


def _open(tmp_path: Path, n: int = 900, **kw: object) -> tuple[Path, Path, stream.StreamedDataset]:
    log = write_log(tmp_path / "log", n=n, **kw)  # type: ignore[arg-type]
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(firstpass.first_pass(log, stream_schema(), progress=False)))
    return log, vocab, stream.open_stream(log, stream_schema(), vocab)


def _same_batch(a: moefast.data.Batch, b: moefast.data.Batch) -> None:
    assert set(a.features) == set(b.features)
    for k, v in a.features.items():
        w = b.features[k]
        if v.dim() == 2:  # a bag: the stream pads to max_len, the in-memory split to the longest bag
            width = min(v.shape[1], w.shape[1])
            assert torch.equal(v[:, :width], w[:, :width]), k
            assert not v[:, width:].any() and not w[:, width:].any(), k
        else:
            assert v.dtype == w.dtype and torch.equal(v, w), k
    assert torch.equal(a.domain, b.domain) and torch.equal(a.label, b.label)


def test_a_buffer_holding_everything_equals_the_in_memory_mixed_loader(tmp_path: Path) -> None:
    log, vocab, ds = _open(tmp_path)
    mem = moefast.data.load("table", path=log, schema=stream_schema(), vocab_from=vocab, use_cache=False,
                            progress=False)
    assert ds.features == mem.features and ds.numeric == mem.numeric and ds.domain_names == mem.domain_names
    assert len(ds.train) == len(mem.train) and len(ds.val) == len(mem.val)
    ours = stream.StreamLoader(ds.train, 64, shuffle_rows=10**6, fragment_order="stored", generator=3)
    theirs = BatchLoader(mem.train, 64, BatchOrder.MIXED, generator=3)
    for _epoch in range(2):
        a, b = list(ours), list(theirs)
        assert len(a) == len(b) == len(theirs)
        for x, y in zip(a, b, strict=True):
            _same_batch(x, y)
    # Evaluation order (no shuffle) is the stored order, as SEQUENTIAL is.
    for x, y in zip(stream.StreamLoader(ds.test, 100, order=BatchOrder.SEQUENTIAL),
                    BatchLoader(mem.test, 100, BatchOrder.SEQUENTIAL), strict=True):
        _same_batch(x, y)


def test_a_small_buffer_shuffles_within_bounds_and_a_resume_replays_and_skips(tmp_path: Path) -> None:
    _, _, ds = _open(tmp_path)
    gen = torch.Generator().manual_seed(11)
    loader = stream.StreamLoader(ds.train, 32, shuffle_rows=100, generator=gen)
    first = list(loader)
    state = gen.get_state()  # the second epoch's starting generator state
    second = list(loader)
    rows = sum(len(b) for b in first)
    assert rows == len(ds.train) and not all(torch.equal(a.label, b.label) for a, b in zip(first, second, strict=False))
    # Kill after 5 batches of epoch 2, resume: the snapshot holds the state and the count.
    resumed = stream.StreamLoader(ds.train, 32, shuffle_rows=100, generator=torch.Generator().set_state(state), skip=5)
    again = list(resumed)
    assert len(again) == len(second) - 5
    for x, y in zip(again, second[5:], strict=True):
        _same_batch(x, y)


def test_two_ranks_read_disjoint_row_groups_whose_union_is_the_split(tmp_path: Path) -> None:
    _, _, ds = _open(tmp_path)
    seen: list[list[str]] = []
    for rank in range(2):
        loader = stream.StreamLoader(ds.train, 16, shuffle_rows=50, generator=5, shards=2, take=[rank])
        units = loader.epoch_units(123, rank)
        seen.append([f"{u.path}:{u.group}" for u in units])
        assert units  # no rank reads everything, every rank reads something
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"{u.path}:{u.group}" for u in ds.train.units())
    total = sum(len(b) for r in range(2) for b in stream.StreamLoader(ds.train, 16, shuffle_rows=50, generator=5,
                                                                       shards=2, take=[r]))
    assert total == len(ds.train)


def test_an_expert_stage_opens_only_its_domains_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, ds = _open(tmp_path)
    opened: list[Path] = []
    real = table_mod.fragment_chunks

    def spy(fragment, path, *args, **kw):  # type: ignore[no-untyped-def]
        opened.append(path)
        return real(fragment, path, *args, **kw)

    monkeypatch.setattr(table_mod, "fragment_chunks", spy)
    b = ds.domain_names.index("b")
    batches = list(stream.StreamLoader(ds.train, 16, domains=[b], generator=1))
    assert batches and all(bool((x.domain == b).all()) for x in batches)
    assert opened and all("site=b" in p.parts for p in opened)


def test_domain_reading_without_domain_partitions_is_refused_in_one_line(tmp_path: Path) -> None:
    _, _, ds = _open(tmp_path, by=("dt",))
    assert len(list(stream.StreamLoader(ds.train, 64, generator=1)))
    with pytest.raises(ValueError, match="partitioned by its domain column"):
        stream.StreamLoader(ds.train, 16, domains=[0])


def test_a_file_changed_since_the_first_pass_is_located_at_open(tmp_path: Path) -> None:
    log, vocab, _ = _open(tmp_path, n=300)
    new = log / "site=a" / "dt=2026-11-28" / "part-9.parquet"
    pq.write_table(pa.table({"rid": ["x"]}), new)
    with pytest.raises(TableError, match=r"part-9\.parquet: added since the first pass"):
        stream.open_stream(log, stream_schema(), vocab)
    new.unlink()
    assert np.isfinite(len(stream.open_stream(log, stream_schema(), vocab).train))


def _rewrite(path: Path, **columns: pa.Array) -> None:
    tab = pq.read_table(path, partitioning=None)
    for name, values in columns.items():
        tab = tab.set_column(tab.schema.get_field_index(name), name, values)
    pq.write_table(tab, path)


def test_bad_input_in_one_partition_is_located(tmp_path: Path) -> None:
    log, vocab, _ = _open(tmp_path, n=600)
    target = log / "site=c" / "dt=2026-11-30" / "part-0.parquet"
    rows = pq.read_metadata(target).num_rows
    # A numeric column of the wrong type (text) in one partition: refused from the footers at the
    # first pass, naming the file and the column (at open, the file changed since the first pass).
    _rewrite(target, age=pa.array(["old"] * rows, pa.string()))
    with pytest.raises(TableError, match=r"site=c/dt=2026-11-30/part-0\.parquet: changed since the first pass"):
        stream.open_stream(log, stream_schema(), vocab)
    with pytest.raises(TableError, match=r"site=c/dt=2026-11-30/part-0\.parquet, column 'age': holds text "
                       r"\(string\), but .* holds number"):
        firstpass.first_pass(log, stream_schema(), progress=False)
    # Without the column in the schema, the log is fine.
    vocab.write_text(json.dumps(firstpass.first_pass(log, {**stream_schema(), "numeric": {}}, progress=False)))
    ds = stream.open_stream(log, {**stream_schema(), "numeric": {}}, vocab)
    assert len(list(stream.StreamLoader(ds.train, 64, generator=1)))
    # Text that is not a number, in a text column: the row.
    _rewrite(target, age=pa.array(["41"] * (rows - 1) + ["old"], pa.string()))
    other = log / "site=a" / "dt=2026-11-28" / "part-0.parquet"
    _rewrite(other, age=pa.array(["30"] * pq.read_metadata(other).num_rows, pa.string()))
    for f in log.rglob("*.parquet"):
        if f not in (target, other):
            _rewrite(f, age=pa.array(["50"] * pq.read_metadata(f).num_rows, pa.string()))
    with pytest.raises(TableError, match=rf"part-0\.parquet, row {rows}, column 'age': not a number: 'old'"):
        firstpass.first_pass(log, stream_schema(), progress=False)
    # A schema that differs between files: a column the schema reads is missing in one file.
    pq.write_table(pq.read_table(target, partitioning=None).drop_columns(["user"]), target)
    with pytest.raises(TableError, match=r"site=c/dt=2026-11-30/part-0\.parquet, column 'user': missing column"):
        firstpass.first_pass(log, {**stream_schema(), "numeric": {}}, progress=False)


def test_an_empty_partition_is_located(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log", n=300)
    empty = log / "site=b" / "dt=2026-12-02"
    empty.mkdir()
    with pytest.raises(TableError, match=r"site=b/dt=2026-12-02: an empty partition: the folder holds no file"):
        firstpass.first_pass(log, stream_schema(), progress=False)
    part = pq.read_table(log / "site=b" / "dt=2026-11-28" / "part-0.parquet", partitioning=None)
    pq.write_table(part.slice(0, 0), empty / "part-0.parquet")
    with pytest.raises(TableError, match=r"site=b/dt=2026-12-02: an empty partition: its files hold no row"):
        firstpass.first_pass(log, stream_schema(), progress=False)


def test_a_file_truncated_or_deleted_since_the_first_pass_is_located(tmp_path: Path) -> None:
    log, vocab, ds = _open(tmp_path, n=300)
    target = log / "site=a" / "dt=2026-11-29" / "part-0.parquet"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # truncated: the footer is gone
    with pytest.raises(TableError, match=r"site=a/dt=2026-11-29/part-0\.parquet: not a readable Parquet file"):
        stream.open_stream(log, stream_schema(), vocab)
    target.write_bytes(data)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))  # rewritten, same bytes
    with pytest.raises(TableError, match=r"part-0\.parquet: changed since the first pass .*: modification time"):
        stream.open_stream(log, stream_schema(), vocab)
    # Deleted after the open, while training reads: the row group is named.
    target.unlink()
    with pytest.raises(TableError, match=r"dt=2026-11-29/part-0\.parquet.*row group 0"):
        list(stream.StreamLoader(ds.train, 64, generator=1))
    with pytest.raises(TableError, match=r"site=a/dt=2026-11-29/part-0\.parquet: deleted since the first pass"):
        stream.open_stream(log, stream_schema(), vocab)
