"""``make golden``: tiny reference runs, recorded once, checked bitwise key by key.

``python tools/golden/golden.py check`` (``make golden``) runs every run of ``protocol.toml``
(every protocol option given explicitly, at one thread, each in a fresh temporary folder) and
compares what it computed with ``reference.json``; ``record`` (``make golden-record``) rewrites
``reference.json`` from the same runs. What is compared, per run and file, key by key:

- every checkpoint: each tensor's SHA-256 (of its bytes), dtype and shape, and the checkpoint's
  metadata, read through moefast's own checkpoint loading (:func:`checkpoint_state`);
- ``predictions.csv`` and the predicted scores of ``moefast predict``: each column by value;
- ``metrics.json``, ``vocab.json`` and a grid cell's ``cell.json``: every value but timings
  (:func:`is_timing`).

Only recorded keys are compared: keys and files a later commit adds are ignored; a recorded key
that is missing is a mismatch. Every mismatch is reported (run, file, key) and the exit status
is 1. The recorded hashes change only in a commit whose message names the intended behaviour
change (docs/reliability.md, "Golden runs").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# Results are bitwise only at a fixed thread count: one thread, set before torch loads (and
# inherited by every run, torchrun's ranks included).
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MOEFAST_THREADS_PER_RANK"):
    os.environ[_variable] = "1"

import numpy as np  # noqa: E402  (after the thread settings above)
import pandas as pd  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTOCOL = HERE / "protocol.toml"
REFERENCE = HERE / "reference.json"
RECORD_COMMAND = "make golden-record (python tools/golden/golden.py record)"
# The code a recording ran: the last commit that touched any of these.
CODE_PATHS = ("moefast", "csrc", "kernels", "CMakeLists.txt", "pyproject.toml")

# The files compared in a run's output folder (anywhere below it), and how each is read.
JSON_FILES = ("metrics.json", "vocab.json", "cell.json")
CSV_FILES = ("predictions.csv", "scores.csv")

# Keys of the JSON files that measure time or traffic, not what the run computed.
TIMING_NAMES = frozenset({"seconds", "train_samples_per_second", "bytes_per_step"})

# A JSON value longer than this (a vocabulary's list of values) is recorded as its digest.
INLINE_CHARS = 120


def is_timing(key: str) -> bool:
    """Whether a JSON key names a timing (or a traffic count), left out of the comparison."""
    return key in TIMING_NAMES or key.endswith("_seconds")


# ---------------------------------------------------------------------------------------------
# Reading what a run wrote, key by key.
# ---------------------------------------------------------------------------------------------


def checkpoint_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full tensors a checkpoint restores, and its metadata, as moefast loads them.

    The one place that knows how a checkpoint is read: a later format (one that stores only what
    a stage changed, and refers to the checkpoint holding the rest) changes its loader, and the
    golden runs compare the reassembled tensors. The run's model is rebuilt the way ``moefast
    export`` does it; every tensor is then overwritten with NaN (-1 for integers), so a tensor the
    loader did not restore cannot pass for a restored one; then the checkpoint is loaded.
    """
    from moefast.export import load_run
    from moefast.runs.checkpoint import load_checkpoint

    run_dir = checkpoint.parent.parent
    model = load_run(run_dir, backend="reference").model
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(math.nan if tensor.is_floating_point() else -1)
    meta = load_checkpoint(checkpoint, model)
    return dict(model.state_dict()), meta


def tensor_digest(tensor: torch.Tensor) -> str:
    """``dtype [shape] sha256:...`` of a tensor's bytes."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)} sha256:{digest}"


def json_value(value: Any) -> Any:
    """A JSON value as recorded: itself, or the digest of its canonical text when long."""
    text = json.dumps(value, sort_keys=True)
    return value if len(text) <= INLINE_CHARS else f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def json_keys(path: Path) -> dict[str, Any]:
    """Every value of a JSON file by its dotted key (list items of objects by index), timings
    left out."""
    found: dict[str, Any] = {}

    def walk(value: Any, key: tuple[str, ...]) -> None:
        if isinstance(value, dict) and value:
            for name, item in value.items():
                if not is_timing(str(name)):
                    walk(item, (*key, str(name)))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                walk(item, (*key, str(index)))
        else:
            found[".".join(key)] = json_value(value)

    walk(json.loads(path.read_text(encoding="utf-8")), ())
    return found


def csv_keys(path: Path) -> dict[str, Any]:
    """Each column of a CSV file by value: ``dtype n sha256:...`` of its parsed values."""
    frame = pd.read_csv(path)
    found: dict[str, Any] = {}
    for name in frame.columns:
        column = frame[name]
        values = column.to_numpy()
        if values.dtype.kind in "biuf":  # numbers: their bytes
            data = np.ascontiguousarray(values).tobytes()
        else:  # text (an object or string column, whose array holds pointers): its values
            data = "\x1f".join(str(v) for v in values).encode()
        found[f"column.{name}"] = f"{column.dtype} n={len(column)} sha256:{hashlib.sha256(data).hexdigest()}"
    return found


def checkpoint_keys(path: Path) -> dict[str, Any]:
    tensors, meta = checkpoint_state(path)
    found: dict[str, Any] = {f"tensor.{name}": tensor_digest(t) for name, t in tensors.items()}
    found.update({f"meta.{name}": json_value(value) for name, value in meta.items() if not is_timing(name)})
    return found


def file_keys(path: Path) -> dict[str, Any]:
    """The compared keys of one output file."""
    if path.suffix == ".pt":
        return checkpoint_keys(path)
    if path.name in CSV_FILES:
        return csv_keys(path)
    return json_keys(path)


def compared_files(out: Path) -> Iterator[Path]:
    """The files compared under a run's output folder (relative paths, sorted)."""
    names = (*JSON_FILES, *CSV_FILES)
    for path in sorted(out.rglob("*")):
        if path.is_file() and (path.name in names or (path.suffix == ".pt" and path.parent.name == "checkpoints")):
            yield path.relative_to(out)


# ---------------------------------------------------------------------------------------------
# Running moefast.
# ---------------------------------------------------------------------------------------------


def moefast(argv: list[str], cwd: Path, log: Path, env: Mapping[str, str] | None = None) -> int:
    """``moefast argv`` in a forked child (torch is imported once, here), in ``cwd``, its output
    in ``log``; the exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.chdir(cwd)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(env or {})
            from moefast import cli

            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class RunFailed(Exception):
    """A golden run did not finish as it should."""


def toml_text(options: Mapping[str, Any]) -> str:
    lines = []
    for key, value in options.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            raise TypeError(f"protocol.toml: {key} = {value!r} is not a string, number or boolean")
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def config_file(protocol: Mapping[str, Any], spec: Mapping[str, Any], folder: Path) -> Path:
    """The run's ``--config`` file: its sections' keys, then its own (paths made absolute)."""
    options: dict[str, Any] = {}
    for section in spec.get("sections", []):
        for key, value in protocol["sections"][section].items():
            if key in options:
                raise ValueError(f"protocol.toml: {key!r} is in two of the sections {spec['sections']}")
            options[key] = value
    for key, value in spec.items():
        if key not in ("kind", "sections", "nproc", "fault", "same_as"):
            options[key] = value
    for key in ("data", "schema"):
        if key in options:
            options[key] = str(ROOT / options[key])
    path = folder / "golden.toml"
    path.write_text(toml_text(options))
    return path


def check_status(name: str, what: str, status: int, log: Path, want: int = 0) -> None:
    if status != want:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RunFailed(f"{name}: {what} exited with status {status}, not {want}; its output ends:\n{tail}")


def run_one(name: str, spec: Mapping[str, Any], protocol: Mapping[str, Any], work: Path,
            outputs: Mapping[str, Path]) -> Path:
    """Run one golden run in its fresh folder under ``work``; the folder its outputs are in."""
    folder = work / name
    folder.mkdir()
    out = folder / "out"
    log = folder / "log.txt"
    kind = spec["kind"]
    # The processed-data cache in the run's own folder: a table parsed by an earlier run (or an
    # earlier commit, under an unchanged cache key) must not stand in for this one's parse.
    env = {"MOEFAST_CACHE": str(folder / "cache")}
    if kind == "export":
        if spec["run"] not in outputs:
            raise RunFailed(f"{name}: exports run {spec['run']!r}, which did not run")
        source = outputs[spec["run"]]
        program = out / "model.pt2"
        out.mkdir()
        status = moefast(["export", str(source), "--method", spec["method"], "--out", str(program), "--quiet"],
                         folder, log, env)
        check_status(name, "moefast export", status, log)
        status = moefast(["predict", "--model", str(program), "--out", str(out / "scores.csv"),
                          "--split", spec["split"], "--batch-size", str(spec["batch_size"]), "--quiet"],
                         folder, log, env)
        check_status(name, "moefast predict", status, log)
        return out
    config = str(config_file(protocol, spec, folder))
    if kind == "grid":
        status = moefast(["grid", "--config", config, "--out", str(out), "--quiet"], folder, log, env)
        check_status(name, "moefast grid", status, log)
        return out
    argv = ["train", "--config", config, "--out", str(out), "--quiet"]
    if "nproc" in spec:
        argv += ["--nproc", str(spec["nproc"])]
    if kind == "kill-resume":
        status = moefast(argv, folder, log, {**env, "MOEFAST_TEST_FAULT": spec["fault"]})
        check_status(name, f"the run with MOEFAST_TEST_FAULT={spec['fault']}", status, log, want=-9)
        if not (out / "resume.pt").is_file():
            raise RunFailed(f"{name}: the killed run left no resume.pt to continue from")
        status = moefast(["train", "--resume", str(out), "--quiet"], folder, log, env)
        check_status(name, "moefast train --resume", status, log)
        return out
    if kind != "train":
        raise ValueError(f"protocol.toml: run {name!r} has an unknown kind {kind!r}")
    if "nproc" in spec:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # torchrun's ranks talk over the loopback (as the tests do)
    status = moefast(argv, folder, log, env)
    check_status(name, "moefast train", status, log)
    return out


# ---------------------------------------------------------------------------------------------
# Record and check.
# ---------------------------------------------------------------------------------------------


def observed(out: Path) -> dict[str, dict[str, Any]]:
    """Every compared key of a run's outputs, by file."""
    return {str(rel): file_keys(out / rel) for rel in compared_files(out)}


def recorded_for(reference: Mapping[str, Any], name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """What run ``name`` is compared with: its own record, or (``same_as = "run/folder"``) that
    run's files under that folder."""
    if "same_as" not in spec:
        return dict(reference["runs"].get(name, {}))
    run, _, prefix = spec["same_as"].partition("/")
    files = reference["runs"].get(run, {})
    return {rel[len(prefix) + 1:]: keys for rel, keys in files.items() if rel.startswith(prefix + "/")}


def short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 100 else text[:97] + "..."


def compare(name: str, want: Mapping[str, Mapping[str, Any]], out: Path) -> tuple[list[str], int]:
    """Mismatches of run ``name``'s outputs in ``out`` against ``want`` (file -> key -> value),
    one line each, and the number of keys compared."""
    problems: list[str] = []
    count = 0
    for rel, keys in want.items():
        path = out / rel
        if not path.is_file():
            problems.append(f"{name}: {rel}: missing (recorded with {len(keys)} keys)")
            continue
        try:
            have = file_keys(path)
        except Exception as exc:
            problems.append(f"{name}: {rel}: cannot be read: {type(exc).__name__}: {exc}")
            continue
        for key, value in keys.items():
            count += 1
            if key not in have:
                problems.append(f"{name}: {rel}: {key}: missing (recorded {short(value)})")
            elif json.dumps(have[key], sort_keys=True) != json.dumps(value, sort_keys=True):
                problems.append(f"{name}: {rel}: {key}: recorded {short(value)}, got {short(have[key])}")
    if not want:
        problems.append(f"{name}: nothing recorded for this run (run make golden-record)")
    return problems, count


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="golden", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("mode", choices=("check", "record"))
    parser.add_argument("--only", nargs="+", metavar="RUN", help="these runs only (check; default all)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (must not exist) and keep the outputs")
    parser.add_argument("--reference", metavar="FILE", default=str(REFERENCE),
                        help="the recorded hashes to check against or record into (default tools/golden/reference.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    # Loaded once here; every run is a forked child that inherits them.
    import moefast.cli
    import moefast.export
    import moefast.train  # noqa: F401

    protocol = tomllib.loads(PROTOCOL.read_text())
    runs: dict[str, dict[str, Any]] = protocol["runs"]
    chosen = list(runs)
    if args.only:
        if args.mode == "record":
            parser.error("record writes every run; --only is for check")
        unknown = sorted(set(args.only) - set(runs))
        if unknown:
            parser.error(f"unknown run(s) {unknown}; the runs are {list(runs)}")
        wanted = set(args.only) | {runs[n]["run"] for n in args.only if runs[n]["kind"] == "export"}
        chosen = [n for n in runs if n in wanted]
    reference: dict[str, Any] = {"runs": {}}
    if args.mode == "check":
        reference = json.loads(Path(args.reference).read_text())
        if reference.get("torch") != torch.__version__:
            print(f"golden: note: recorded under torch {reference.get('torch')}, this is {torch.__version__}")

    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True)
        holder = None
    else:
        holder = tempfile.TemporaryDirectory(prefix="moefast-golden-")
        work = Path(holder.name)
    started = time.perf_counter()
    problems: list[str] = []
    compared = 0
    outputs: dict[str, Path] = {}
    try:
        # Every run first, then every comparison: the runs are forked from this process before
        # it has loaded a model or a checkpoint.
        for name in chosen:
            began = time.perf_counter()
            try:
                outputs[name] = run_one(name, runs[name], protocol, work, outputs)
            except RunFailed as exc:
                problems.append(str(exc))
                print(f"golden: {name}: FAILED to run", flush=True)
                continue
            print(f"golden: {name}: ran ({time.perf_counter() - began:.1f} s)", flush=True)
        for name, out in outputs.items():
            spec = runs[name]
            if args.mode == "record" and "same_as" not in spec:
                reference["runs"][name] = observed(out)
                continue
            # A kill-resume run is compared with its uninterrupted run also when recording: the
            # equality must hold at the recorded commit.
            found, count = compare(name, recorded_for(reference, name, spec), out)
            problems += found
            compared += count
            print(f"golden: {name}: {count} keys compared, {len(found)} mismatches", flush=True)
    finally:
        if holder is not None:
            holder.cleanup()
    took = time.perf_counter() - started
    if problems:
        print(f"golden: {len(problems)} mismatch(es) in {took:.0f} s:")
        for line in problems:
            print(f"  {line}")
        if args.mode == "record":
            print("golden: nothing recorded")
        return 1
    if args.mode == "record":
        head = git("rev-parse", "--short", "HEAD")
        code = git("log", "-1", "--format=%h", "--", *CODE_PATHS)
        dirty = bool(git("status", "--porcelain", "--", *CODE_PATHS))
        payload = {
            "recorded_at": code + (" (with uncommitted changes)" if dirty else ""),
            "head": head,
            "command": RECORD_COMMAND,
            "threads": 1,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "runs": reference["runs"],
        }
        Path(args.reference).write_text(json.dumps(payload, indent=1) + "\n")
        keys = sum(len(k) for files in reference["runs"].values() for k in files.values())
        print(f"golden: recorded {len(reference['runs'])} runs, {keys} keys, in {args.reference} ({took:.0f} s)")
        return 0
    print(f"golden: {len(chosen)} runs, {compared} keys: all bitwise equal ({took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
