"""``moefast export RUN_DIR [--method NAME] --out model.pt2``: a run's merged model as a program.

The run's trained model is rebuilt from its last checkpoint, merged per domain
(:func:`moefast.export.merge`) and exported with ``torch.export`` (dynamic batch dimension); it
loads with plain PyTorch (``torch.export.load``), without moefast. Beside ``model.pt2`` go
``model.pt2.json`` (inputs, output, torch version, domain map, features, the run's data flags)
and, when the run has them, its vocabularies and numeric statistics under
``model.preprocessing/`` (docs/serving.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moefast import log
from moefast.cli._options import UserError
from moefast.config import TablePrecision
from moefast.runs.files import DATASET_RECORD, VOCAB

__all__ = ["NAME", "add_parser", "run"]

NAME = "export"
# Files of a run directory (or of the top folder of a several-method run) that carry the data's
# preprocessing, copied beside the program: the tabular source's vocabularies, numeric
# statistics and domain map (moefast.data.vocab) and the run's dataset record.
PREPROCESSING_FILES = (VOCAB, DATASET_RECORD)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``moefast``'s subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="export a run's merged model as a torch.export program (.pt2)",
        description="Merge a trained run's adapters per domain and export the result with "
        "torch.export (dynamic batch); it loads with plain torch.export.load, without moefast.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (moefast train --out)")
    parser.add_argument("--method", help="base | mlora | moe-mlora, when RUN_DIR holds several")
    parser.add_argument("--out", required=True, help="the program file, ending in .pt2")
    parser.add_argument("--onnx", metavar="PATH", help="also write the program as ONNX (.onnx; needs the "
                        "onnx and onnxscript packages, which moefast does not install)")
    parser.add_argument("--table-precision", choices=[p.value for p in TablePrecision], default="fp32",
                        help="the exported embedding tables: fp32 (default, whatever the run trained) "
                        "or the run's own half precision (fp16 / bf16; another is refused, as it would round "
                        "the weights)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``moefast export`` for parsed ``args``."""
    from moefast import export
    from moefast.cli._options import load_dataset
    from moefast.cli.predict import _data_config, run_data_options
    from moefast.nn.embedding import EmbeddingCollection

    out = Path(args.out)
    if out.suffix != ".pt2":
        raise UserError(f"--out {args.out!r}: an exported program is a .pt2 file")
    if args.onnx is not None:
        from moefast.export._program import onnx_missing

        if Path(args.onnx).suffix != ".onnx":
            raise UserError(f"--onnx {args.onnx!r}: an ONNX model is a .onnx file")
        missing = onnx_missing()
        if missing is not None:  # before the minutes of work, not after
            raise UserError(f"--onnx: {missing}")
    folder = export.method_dir(args.run_dir, args.method)
    options = run_data_options(folder)
    dataset = None
    if not (folder / DATASET_RECORD).is_file():  # a run older than dataset.json: its data says
        if options is None:
            raise UserError(f"run directory {str(folder)!r} has neither dataset.json nor config.toml")
        dataset = load_dataset(_data_config(options))
    loaded = export.load_run(folder, dataset=dataset, backend="reference")
    collections = [m for m in loaded.model.modules() if isinstance(m, EmbeddingCollection)]
    own = collections[0].precision
    wanted = TablePrecision(args.table_precision)
    if wanted is not TablePrecision.FP32 and wanted is not own:
        # fp32 holds any half table exactly; one half precision rounds another (or fp32's) weights.
        raise UserError(f"--table-precision {wanted.value}: the run's tables are {own.value}; a program's "
                        f"tables are fp32 or the run's own precision ({own.value})")
    # The program holds float32 tables unless asked otherwise (half tables convert exactly).
    for collection in collections:
        collection.set_precision(wanted)
    merged = export.merge(loaded.model, backend="reference")
    log.configure(quiet=args.quiet)
    say = log.say
    say(f"exporting the merged {loaded.model.name} / {loaded.model.tower.kind.value} model of {folder} "
        f"({len(loaded.record['domains'])} domains)")
    extra = {name: folder / name for name in PREPROCESSING_FILES if (folder / name).is_file()}
    for name in PREPROCESSING_FILES:
        if name not in extra and (folder.parent / name).is_file() and folder != Path(args.run_dir):
            extra[name] = folder.parent / name
    payload = export.export_program(merged, out, record=loaded.record, extra_files=extra,
                                    data_options=options)
    say(f"program: {out} (torch {payload['torch_version']}); inputs and preprocessing: {out}.json")
    if args.onnx is not None:
        say(f"ONNX: {export.export_onnx(merged, args.onnx)}")
    return 0
