"""``moefast vocab``: the first pass over a streamed click log's training split (issue 26).

Writes ``vocab.json`` (vocabularies, numeric statistics, domains, pretrained files, and the
fingerprint of the file list) in bounded memory; ``moefast train --vocab-from`` reuses it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

NAME = "vocab"

__all__ = ["NAME", "add_parser", "run"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        NAME, help="the first pass over a Parquet click log's training split: write vocab.json",
        description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a Parquet file or a (Hive-partitioned) folder of them")
    parser.add_argument("--schema", required=True, help="the schema TOML (split kind column, time, partition or hash)")
    parser.add_argument("--out", required=True, help="the vocab.json to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from moefast.data.firstpass import first_pass
    from moefast.runs.writer import atomic_write

    artifacts = first_pass(args.data, args.schema, progress=False if args.quiet else None)
    try:
        text = json.dumps(artifacts, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as exc:
        raise ValueError(f"{args.out}: not written: a statistic is not a finite number ({exc})") from None
    atomic_write(args.out, lambda f: f.write(text.encode("utf-8")))
    rows = artifacts["stream"]["rows"]
    sizes = ", ".join(f"{k} {v['vocab_size']}" for k, v in artifacts["categorical"].items())
    print(f"{args.out}: {len(artifacts['stream']['files'])} files, {rows['train']} training rows "
          f"({rows['val']} val, {rows['test']} test), {len(artifacts['domains']['names'])} domains; ids: {sizes}")
    return 0
