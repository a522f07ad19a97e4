"""``moefast predict``: score a dataset with a trained run or an exported program.

``moefast predict --model RUN_DIR_or_model.pt2 [the train command's data flags] --out
scores.csv`` loads the data as ``moefast train`` does (without data flags: the run's own, from
its ``config.toml`` or the program's ``.json``), checks that it speaks the model's language
(same fields and vocabulary sizes, the same domain map, ids numbered from the same files), scores one
split in batches with a progress bar and writes ``row, domain, domain_name, label, logit,
score`` (``score = sigmoid(logit)``) as CSV or Parquet. A run directory is served by its merged
model (:func:`moefast.export.merge`; ``--unmerged`` scores with the trained model itself), a
``.pt2`` by the program through plain ``torch.export.load``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moefast import log
from moefast.cli._options import (
    DATA_OPTIONS,
    UserError,
    add_option_groups,
    converters,
    given_options,
    load_dataset,
)
from moefast.config import STREAM_OPTIONS, DataConfig, load_options
from moefast.log import progress_bar
from moefast.runs.files import CONFIG_TOML, DATASET_RECORD, VOCAB

__all__ = ["NAME", "SPLITS", "add_parser", "check_compatible", "domain_ids", "merge_data_options", "run",
           "run_data_options"]

NAME = "predict"
SPLITS = ("test", "val", "train")
OUT_SUFFIXES = (".csv", ".parquet")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand to ``moefast``'s subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="score a dataset with a trained run directory or an exported .pt2 program",
        description="Score one split of a dataset (the train command's data flags; default: the "
        "run's own data) with a run directory's merged model or an exported program, in batches, "
        "and write row, domain, domain_name, label, logit and score (the probability).",
    )
    parser.add_argument("--model", required=True, help="a run directory (or a method's subfolder) or a .pt2 file")
    parser.add_argument("--method", help="the method to serve when the run directory holds several")
    parser.add_argument("--out", required=True, help="scores file: .csv or .parquet")
    parser.add_argument("--split", choices=SPLITS, default="test", help="the split to score (default test)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per batch (default 4096)")
    parser.add_argument("--unmerged", action="store_true",
                        help="score a run directory with its trained model, not the merged one")
    parser.add_argument("--trust-unverified", action="store_true",
                        help="load a .pt2 whose .json records no SHA-256 (exported by an older moefast) unchecked; "
                        "a recorded SHA-256 is always checked")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_option_groups(parser, (("data (default: the run's own)", DATA_OPTIONS),))
    return parser


def run_data_options(folder: Path) -> dict[str, Any] | None:
    """The data flags a run was trained with (its ``config.toml``, or its parent's for one
    method of several), or None when it recorded none (a ``fit`` run)."""
    from moefast.cli.train import read_config

    for candidate in (folder / CONFIG_TOML, folder.parent / CONFIG_TOML):
        if candidate.is_file():
            try:
                options = read_config(str(candidate))
            except UserError as exc:
                raise UserError(f"the run's data flags cannot be read: {exc}") from None
            return {k: v for k, v in options.items() if k in DataConfig.__dataclass_fields__}
    return None


def merge_data_options(given: Mapping[str, Any], own: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The data flags ``predict`` reads with: the run's own (``own``; None when it recorded none),
    changed by those ``given`` on the command line, so that ``--stream`` or ``--data new/`` alone
    keeps the run's schema, vocabularies and source. A ``--dataset`` other than the run's starts
    from that source's defaults instead (the run's flags would not apply to it). The run's
    recorded ``--vocab-from`` is not reused: a path on the machine that trained it, while the
    vocabularies the model was trained with are saved beside it (``vocab.json``; a program's
    ``.preprocessing/``), which ``predict`` reads unless ``--vocab-from`` is given."""
    if own is not None:
        own = {k: v for k, v in own.items() if k != "vocab_from"}
    if not given:
        return None if own is None else dict(own)
    default = DataConfig.__dataclass_fields__["dataset"].default
    if own is None or given.get("dataset", own.get("dataset", default)) != own.get("dataset", default):
        return dict(given)
    if "data" in given:
        # New data is read as the command line says: streamed only with --stream (a CSV file
        # cannot be, and --stream cannot be turned off once inherited).
        own = {k: v for k, v in own.items() if k not in STREAM_OPTIONS}
    return {**own, **given}


def _data_config(options: Mapping[str, Any]) -> DataConfig:
    try:
        return DataConfig(**options)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def check_compatible(record: Mapping[str, Any], dataset: Any) -> None:
    """Refuse data the model cannot read the same way it was trained: other fields or vocabulary
    sizes, other numeric fields, another source, or (real-format loaders, which number ids from
    the files they read) other raw files. ``UserError`` naming the difference."""
    want = [(f["name"], int(f["vocab_size"]), f["pooling"]) for f in record["features"]]
    have = [(f.name, f.vocab_size, f.pooling.value) for f in dataset.features]
    if want != have:
        diff = next((f"{w} vs {h}" for w, h in zip(want, have, strict=False) if w != h),
                    f"{len(want)} fields vs {len(have)}")
        raise UserError(f"dataset {dataset.name!r} does not have the model's fields (name, vocabulary size, "
                        f"pooling): model {want} vs data {have}; first difference: {diff}")
    numeric_want = [str(s["name"]) for s in record["numeric"]]
    numeric_have = [s.name for s in getattr(dataset, "numeric", ())]
    if numeric_want != numeric_have:
        raise UserError(f"dataset {dataset.name!r} has numeric fields {numeric_have}, the model {numeric_want}")
    source = record["source"]
    info = dataset.info
    name = str(info.get("source", dataset.name))
    if name != source.get("name"):
        raise UserError(f"the model was trained on source {source.get('name')!r}, the data is {name!r}")
    if source.get("id_map") == "vocabulary":
        from moefast.runs.records import vocabulary_digest

        if vocabulary_digest(dataset) != source.get("vocabulary"):
            raise UserError(
                f"dataset {dataset.name!r} maps raw values through other vocabularies than the run's "
                "vocab.json: load it with --vocab-from the run directory (predict does so unless "
                "--vocab-from is given)"
            )
    if source.get("id_map") == "fingerprint":
        cache = info.get("cache")
        fingerprint = cache.get("key") if isinstance(cache, Mapping) else None
        if fingerprint != source.get("fingerprint"):
            raise UserError(
                f"the {name} loader numbers users and items from the files it reads, and the run recorded "
                f"no raw-id map, only the fingerprint of its files and options ({source.get('fingerprint')}); "
                f"these give {fingerprint}, so an id would name another user or item. Score the run's own "
                "files (same --data-dir and options), or train on these"
            )


def domain_ids(record: Mapping[str, Any], dataset: Any, domain: Any) -> Any:
    """A split's ``domain`` column (int64 ``[n]``) if the data numbers its domains as the model's
    domain map does; ``UserError`` naming a domain the model does not know, or saying that the
    data numbers the same domains in another order (remapping them would leave a ``domain``
    feature column with the old ids: no silent remapping)."""
    model_names = [str(d["name"]) for d in record["domains"]]
    data_names = [str(n) for n in dataset.domain_names]
    if data_names == model_names:
        return domain
    present = sorted(set(domain.tolist())) if domain.numel() else []
    unknown = [d for d in present if data_names[d] not in model_names]
    if unknown:
        raise UserError(f"domain {data_names[unknown[0]]!r} (id {unknown[0]} in {dataset.name!r}) is unknown to "
                        f"the model; it knows {model_names}")
    raise UserError(f"dataset {dataset.name!r} numbers its domains {data_names}, the model {model_names}: "
                    "load the data so that its domain map is the model's")


def _load_program(path: Path, *, trust_unverified: bool = False) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The program at ``path`` and its ``.json``, checked against the SHA-256 the ``.json``
    records before torch reads a byte of it (torch.export.load does not check the archive's
    CRCs: a damaged weight scored without complaint)."""
    import logging
    import warnings

    import torch

    from moefast.export._program import program_sha256
    from moefast.runs.settings import read_json

    meta_path = path.parent / f"{path.name}.json"
    if not meta_path.exists():
        raise UserError(f"{str(meta_path)!r} is missing: it describes the program's inputs (moefast export writes it)")
    meta = read_json(meta_path, "program record", expect=dict)
    recorded = meta.get("program_sha256")
    if recorded is None and not trust_unverified:
        raise UserError(f"{str(meta_path)!r} records no SHA-256 of the program (exported by an older moefast?), so "
                        f"{str(path)!r} cannot be checked: export it again, or pass --trust-unverified to load it "
                        "unchecked")
    if recorded is not None:
        actual = program_sha256(path)
        if actual != recorded:
            raise UserError(f"{str(path)!r} is not the program moefast export wrote: its SHA-256 is {actual[:16]}..., "
                            f"{str(meta_path)!r} records {str(recorded)[:16]}... (damaged or replaced); export it again")
    # A truncated archive makes torch log its traceback (a dozen lines on the torch.export logger)
    # before it fails: the one line below says it.
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path)).module()
    except Exception as exc:  # a damaged or foreign file: said in one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{str(path)!r} cannot be loaded as a torch.export program: {detail}") from None
    finally:
        logger.setLevel(level)
    if not isinstance(meta.get("dataset"), dict):
        raise UserError(f"{str(meta_path)!r} records no dataset: export it again with moefast export")
    return program, meta


def run(args: argparse.Namespace) -> int:
    """Run ``moefast predict`` for parsed ``args``."""
    import torch

    from moefast import export

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.suffix not in OUT_SUFFIXES:
        raise UserError(f"--out {args.out!r}: scores are written as .csv or .parquet")
    model_path = Path(args.model)
    given = {k: v for k, v in given_options(args).items() if k in converters(DATA_OPTIONS)}
    log.configure(quiet=args.quiet)
    say = log.say

    score: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
    if model_path.suffix == ".pt2":
        if args.unmerged or args.method:
            raise UserError("--unmerged and --method apply to a run directory, not a .pt2 program")
        if not model_path.is_file():
            raise UserError(f"--model {args.model!r} does not exist")
        program, meta = _load_program(model_path, trust_unverified=args.trust_unverified)
        record = meta["dataset"]
        options = merge_data_options(given, meta.get("data_options"))
        numeric_names = [str(s["name"]) for s in record["numeric"]]
        field_names = [str(f["name"]) for f in record["features"]]

        def score(features: dict[str, torch.Tensor], domain: torch.Tensor) -> torch.Tensor:
            ids = {n: features[n] for n in field_names}
            if numeric_names:
                return program(ids, torch.stack([features[n] for n in numeric_names], dim=1), domain)
            return program(ids, domain)

        what = f"program {model_path}"
        vocab_source: Path | None = model_path.parent / f"{model_path.stem}.preprocessing" / VOCAB
    else:
        if args.trust_unverified:
            raise UserError("--trust-unverified applies to a .pt2 program, not a run directory (checkpoints are "
                            "always checked)")
        folder = export.method_dir(model_path, args.method) if model_path.exists() else None
        if folder is None:
            raise UserError(f"--model {args.model!r} does not exist")
        options = merge_data_options(given, run_data_options(folder))
        dataset = None
        if not (folder / DATASET_RECORD).is_file():  # a run older than dataset.json
            if options is None:
                raise UserError(f"run directory {str(folder)!r} predates dataset.json and records no data "
                                "flags: give them")
            if options.get("dataset") == "table" and options.get("vocab_from") is None:
                options = {**options, "vocab_from": str(folder)}  # the model's vocabularies, not new ones
            dataset = load_dataset(_data_config(options))
        loaded = export.load_run(folder, dataset=dataset)
        record = loaded.record
        model = loaded.model if args.unmerged else export.merge(loaded.model)

        def score(features: dict[str, torch.Tensor], domain: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(features, domain)

        vocab_source = folder
        what = (f"{'trained' if args.unmerged else 'merged'} {loaded.model.name} / "
                f"{loaded.model.tower.kind.value} model of {folder}")
    if options is None:
        raise UserError("the model records no data flags (a fit() run): give the data flags")
    if options.get("dataset") == "table" and options.get("vocab_from") is None:
        # The tabular source maps raw values (unseen ones to the OOV id) with the run's vocabularies.
        vocab = vocab_source
        if vocab is None or not Path(vocab).exists():
            raise UserError(f"the model has no vocab.json beside it ({vocab}): give --vocab-from")
        options = {**options, "vocab_from": str(vocab)}
        say(f"vocabularies: {vocab}")
    if not given:
        say(f"data: the run's own ({', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'})")
    config = _data_config(options)
    try:  # a flag that does not apply to the dataset: one line, before any read
        load_options(config, lambda key: "--" + key.replace("_", "-"))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if options.get("stream"):
        return _predict_stream(args, out, options, record, score, what, say)
    dataset = load_dataset(config)
    check_compatible(record, dataset)
    split = getattr(dataset, args.split)
    domain = domain_ids(record, dataset, split.domain)
    say(f"scoring split {args.split!r} of {dataset.name} ({len(split)} rows) with the {what}")
    logits = _score_split(split, domain, score, args.batch_size, quiet=args.quiet)
    keys = dataset.info.get("keys") if args.split == "test" else None
    _write_scores(out, split, domain, logits, [str(d["name"]) for d in record["domains"]], keys)
    say(f"scores: {out}")
    return 0


def _predict_stream(args: argparse.Namespace, out: Path, options: Mapping[str, Any], record: Mapping[str, Any],
                    score: Callable[..., Any], what: str, say: Callable[[str], None]) -> int:
    """``moefast predict`` of a streamed log: its rows read in stored order and scored batch by
    batch, each batch written to the scores file (Parquet or CSV, the columns of the in-memory
    predict, the test split's keys included) as it is scored: one batch held at a time."""
    import numpy as np
    import pyarrow as pa
    import torch

    from moefast.data.batching import BatchOrder
    from moefast.data.stream import StreamLoader, load_stream
    from moefast.runs.writer import write_batches

    try:
        dataset = load_stream(path=options["data"], schema=options["schema"], vocab_from=options["vocab_from"],
                              read_ahead=options.get("read_ahead"), check_files=False, progress=False)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    check_compatible(record, dataset)
    names = [str(d["name"]) for d in record["domains"]]
    if list(dataset.domain_names) != names:
        raise UserError(f"dataset {dataset.name!r} numbers its domains {list(dataset.domain_names)}, the model "
                        f"{names}: load the data so that its domain map is the model's")
    split = getattr(dataset, args.split)
    say(f"scoring split {args.split!r} of {dataset.name} (streamed) with the {what}")
    # The key column as the in-memory predict writes it: the test split's, when the schema names one.
    keyed = args.split == "test" and dataset.schema.key is not None
    loader = StreamLoader(split, args.batch_size, order=BatchOrder.SEQUENTIAL, read_ahead=dataset.read_ahead,
                          keys=keyed)
    label_names = np.array(names, dtype=object)

    def batches() -> Any:
        done = 0
        with progress_bar(enabled=not args.quiet, total=None, unit="row", desc="predict") as bar:
            for batch, keys in loader.keyed():
                logits = score(dict(batch.features), batch.domain).float()
                bad = ~torch.isfinite(logits)
                if bool(bad.any()):
                    row = done + int(torch.nonzero(bad)[0, 0])
                    raise ValueError(f"the model gave a non-finite logit ({float(logits[bad][0])}) for row {row}")
                domain = batch.domain.numpy()
                columns = {"row": pa.array(np.arange(done, done + len(batch), dtype=np.int64))}
                if keys is not None:
                    columns["key"] = keys
                yield pa.record_batch(columns | {
                    "domain": pa.array(domain),
                    "domain_name": pa.array(label_names[domain].tolist(), pa.string()),
                    "label": pa.array(batch.label.numpy().astype("int8")),
                    "logit": pa.array(logits.numpy()),
                    "score": pa.array(torch.sigmoid(logits.double()).numpy()),
                })
                done += len(batch)
                bar.update(len(batch))

    write_batches(out, batches())  # Parquet for a .parquet name, else CSV, batch by batch
    say(f"scores: {out}")
    return 0


def _score_split(split: Any, domain: Any, score: Callable[..., Any], batch_size: int, *, quiet: bool) -> Any:
    import torch

    n = len(split)
    out = torch.empty(n, dtype=torch.float32)
    with progress_bar(enabled=not quiet, total=n, unit="row", desc="predict") as bar:
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(start + batch_size, n))
            batch = split.rows(rows)
            out[rows] = score(dict(batch.features), domain[rows]).float()
            bar.update(len(rows))
    if n and not bool(torch.isfinite(out).all()):
        row = int(torch.nonzero(~torch.isfinite(out))[0, 0])
        raise ValueError(f"the model gave a non-finite logit ({out[row].item()}) for row {row}")
    return out


def _write_scores(
    out: Path, split: Any, domain: Any, logits: Any, domain_names: list[str], keys: Any = None
) -> None:
    """``row, [key,] domain, domain_name, label, logit, score``; ``key`` is the tabular source's
    key column of scoring data (``info["keys"]``, the test split's rows in order)."""
    import numpy as np
    import pandas as pd
    import torch

    from moefast.runs.writer import write_frame

    names = np.array(domain_names, dtype=object)
    frame = pd.DataFrame({
        "row": np.arange(len(split), dtype=np.int64),
        "domain": domain.numpy(),
        "domain_name": names[domain.numpy()] if len(split) else np.array([], dtype=object),
        "label": split.label.numpy().astype("int8"),
        "logit": logits.numpy(),
        "score": torch.sigmoid(logits.double()).numpy(),
    })
    if isinstance(keys, list) and len(keys) == len(split):
        frame.insert(1, "key", keys)
    write_frame(out, frame)  # Parquet for a .parquet name, else CSV
