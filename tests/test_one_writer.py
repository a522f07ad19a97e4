"""One writer for every output (issue 25): outside :mod:`moefast.runs.writer`, no module of
``moefast/`` or ``kernels/`` creates, fills or replaces a file any other way.

The lint reads each module's syntax tree. A call's name is resolved through the module's imports
(``np.savez`` is ``numpy.savez``, ``pq.write_table`` is ``pyarrow.parquet.write_table``); a
call into :mod:`moefast.runs.writer` is the writer itself. Forbidden:

- ``open`` / ``Path.open`` / ``gzip.open`` / ``os.fdopen`` ... in a writing mode (``w``, ``a``,
  ``x``, ``+``) or a mode computed at run time (for a method ``.open(...)``, whose mode may be any
  positional argument, any positional argument that is not a constant), ``os.open`` with any flag
  that writes or creates;
- ``io.FileIO`` and ``pyarrow.OSFile`` in a writing mode, ``numpy.memmap`` and
  ``numpy.lib.format.open_memmap`` in any mode but a read-only one (their default, ``r+``,
  writes), and ``pyarrow.output_stream``;
- ``write_text`` / ``write_bytes`` / ``touch`` and the links (``symlink_to``, ``os.link``...);
- ``os.replace`` / ``os.rename`` / ``Path.replace`` / ``Path.rename`` (one argument: ``str.replace``
  takes two), ``os.write`` / ``os.pwrite`` / ``os.ftruncate``, and ``shutil``'s copies and moves;
- ``tempfile``'s named files (``mkstemp``, ``NamedTemporaryFile``...);
- ``np.save*``, ``ndarray.tofile``, ``torch.save``, ``torch.export.save``, ``torch.onnx.export``,
  ``torch.jit.save`` and any ``.save(...)`` method;
- ``DataFrame.to_*`` given a destination (``to_csv(index=False)`` returns text and writes
  nothing), the pyarrow writers and ``savefig``.

A lambda passed straight to a writer function (``atomic_write(dest, lambda handle:
torch.save(payload, handle))``) fills the writer's handle or temporary path: its body is not
checked. Each allowed exception is listed in :data:`ALLOWED` with its reason; one that no longer matches
anything fails the test too, so the list cannot go stale.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from moefast.runs.writer import WRITE_LOG_ENV

ROOT = Path(__file__).resolve().parents[1]
WRITER = "moefast/runs/writer.py"
WRITER_MODULE = "moefast.runs.writer"

# (file, enclosing function, forbidden call) -> why it is allowed.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("moefast/runs/rundir.py", "_open_locked", "os.open"):
        "a lock file (the run marker, a grid's or claims table's .lock) opened for fcntl.flock: the "
        "lock lives on that file's descriptor, which an atomic rename would orphan",
    ("moefast/runs/rundir.py", "claim_run_dir", "os.ftruncate"):
        "the run marker rewritten in place through the descriptor that holds its flock",
    ("moefast/runs/rundir.py", "claim_run_dir", "os.pwrite"):
        "the run marker rewritten in place through the descriptor that holds its flock",
}

# Module functions that create, fill or replace a file, by resolved name.
FUNCTIONS = {
    "os.replace", "os.rename", "os.renames", "os.link", "os.symlink", "os.mkfifo", "os.mknod",
    "os.write", "os.pwrite", "os.writev", "os.pwritev", "os.truncate", "os.ftruncate",
    "shutil.copy", "shutil.copy2", "shutil.copyfile", "shutil.copytree", "shutil.move",
    "shutil.copyfileobj", "shutil.make_archive", "shutil.unpack_archive",
    "tempfile.mkstemp", "tempfile.NamedTemporaryFile", "tempfile.TemporaryFile",
    "tempfile.SpooledTemporaryFile", "urllib.request.urlretrieve",
    "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt",
    "torch.save", "torch.export.save", "torch.onnx.export", "torch.jit.save",
    "matplotlib.pyplot.savefig", "pandas.to_pickle", "pyarrow.output_stream",
}
# Functions that open a file in a mode: (the mode's position, its default).
MODE_OPENERS = {"numpy.memmap": (2, "r+"), "numpy.lib.format.open_memmap": (1, "r+"),
                "io.FileIO": (1, "r"), "pyarrow.OSFile": (1, "r")}
# Their modes that neither create nor change the file (numpy's "c" is copy-on-write in memory).
READ_ONLY_MODES = {"r", "rb", "c", "readonly", "copyonwrite"}
# Writers known by their last name, whatever module they came from (pyarrow.parquet,
# pyarrow.csv, pyarrow.feather, pyarrow.ipc, pyarrow.orc, pyarrow.dataset).
WRITER_NAMES = {"write_table", "write_to_dataset", "write_dataset", "write_csv", "write_feather",
                "ParquetWriter", "CSVWriter", "RecordBatchFileWriter", "RecordBatchStreamWriter",
                "new_file", "new_stream"}
# Methods that always write (a Path's, an array's, a figure's, a scripted module's).
METHODS = {"write_text", "write_bytes", "touch", "symlink_to", "hardlink_to", "link_to", "tofile",
           "savefig", "save"}
# DataFrame / Series methods that write when given a destination.
FRAME_METHODS = {"to_csv", "to_json", "to_parquet", "to_excel", "to_pickle", "to_feather", "to_hdf",
                 "to_stata", "to_orc", "to_html", "to_latex", "to_markdown", "to_xml", "to_string",
                 "to_sql"}
FRAME_DESTINATIONS = {"path", "path_or_buf", "path_or_buffer", "buf", "excel_writer", "fname", "name", "con"}
WRITING_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC", "O_TMPFILE"}
_MODE = re.compile(r"^[rwxabtU+]{1,4}$")


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    function: str
    call: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}: {self.call}"


def _aliases(tree: ast.Module, module: str) -> dict[str, str]:
    """Local name -> the dotted name it was imported as, from every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: len(module.split(".")) - node.level]
                base = ".".join([*package, *([node.module] if node.module else [])])
            for alias in node.names:
                names[alias.asname or alias.name] = f"{base}.{alias.name}"
    return names


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None when the chain does not start at a plain name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _constant(node: ast.expr | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _writing_mode(mode: object) -> bool:
    return isinstance(mode, str) and bool(_MODE.match(mode)) and any(c in mode for c in "wax+")


def _open_writes(call: ast.Call, mode_position: int | None) -> bool:
    """Whether an ``open``-like call opens for writing: its ``mode=`` or the positional argument at
    ``mode_position`` (None: any string argument that reads as a mode)."""
    for keyword in call.keywords:
        if keyword.arg == "mode":
            value = _constant(keyword.value)
            return value is None or _writing_mode(value)  # a mode computed at run time is suspect
    if mode_position is None:  # a computed positional argument may be the mode (Path.open(mode))
        return any(not isinstance(arg, ast.Constant) or _writing_mode(arg.value) for arg in call.args)
    if len(call.args) > mode_position:
        value = _constant(call.args[mode_position])
        return value is None or _writing_mode(value)
    return False


def _opener_writes(call: ast.Call, mode_position: int, default: str) -> bool:
    """Whether a :data:`MODE_OPENERS` call may create or change its file: a mode (given, or the
    default) that is not read-only, or one computed at run time."""
    mode: object = default
    for keyword in call.keywords:
        if keyword.arg == "mode":
            mode = _constant(keyword.value)
            break
    else:
        if len(call.args) > mode_position:
            mode = _constant(call.args[mode_position])
    return mode not in READ_ONLY_MODES


def _flags_write(node: ast.expr) -> bool:
    """Whether ``os.open``'s flags expression names a flag that writes or creates (a computed
    flag that names none is suspect too)."""
    names = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    flags = {n for n in names if n.startswith("O_")}
    return bool(flags & WRITING_FLAGS) or not flags


def _forbidden(call: ast.Call, aliases: dict[str, str]) -> str | None:
    """The forbidden call ``call`` makes (as listed in :data:`ALLOWED`), or None."""
    func = call.func
    parts = _dotted(func)
    if parts is not None and parts[0] in aliases:  # a module's function, by its imported name
        name = ".".join([aliases[parts[0]], *parts[1:]])
        if name == WRITER_MODULE or name.startswith(WRITER_MODULE + "."):
            return None
        last = name.rsplit(".", 1)[-1]
        if name in MODE_OPENERS:
            return name if _opener_writes(call, *MODE_OPENERS[name]) else None
        if name in FUNCTIONS or last in WRITER_NAMES:
            return name
        if name == "os.open":
            return name if len(call.args) < 2 or _flags_write(call.args[1]) else None
        if name == "os.fdopen" or last == "open":  # gzip.open, io.open, tarfile.open, os.fdopen
            return name if _open_writes(call, 1) else None
        if name == "zipfile.ZipFile":
            return name if _open_writes(call, 1) else None
        # A module's other functions (dataclasses.replace(x), cache.write(...)) are not methods of
        # a path or a frame; only the names that always write are checked further.
        return f".{parts[-1]}" if len(parts) > 1 and parts[-1] in METHODS else None
    if isinstance(func, ast.Name):
        if func.id == "open" and _open_writes(call, 1):
            return "open"
        return None
    if not isinstance(func, ast.Attribute):
        return None
    method = func.attr
    if method in METHODS or method in WRITER_NAMES:
        return f".{method}"
    if method in ("replace", "rename") and len(call.args) == 1 and not call.keywords:
        return f".{method}"  # Path.replace(target); str.replace and DataFrame.rename(columns=) differ
    if method == "open" and _open_writes(call, None):
        return ".open"
    if method in FRAME_METHODS and (call.args or any(k.arg in FRAME_DESTINATIONS for k in call.keywords)):
        return f".{method}"
    return None


def _is_writer(call: ast.Call, aliases: dict[str, str]) -> bool:
    parts = _dotted(call.func)
    if parts is None or parts[0] not in aliases:
        return False
    name = ".".join([aliases[parts[0]], *parts[1:]])
    return name.startswith(WRITER_MODULE + ".")


def lint_source(source: str, file: str, module: str) -> list[Finding]:
    """Every forbidden call in ``source``, with its enclosing function (``<module>`` at top level)."""
    tree = ast.parse(source, file)
    aliases = _aliases(tree, module)
    found: list[Finding] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        callbacks: list[ast.AST] = []
        if isinstance(node, ast.Call):
            if _is_writer(node, aliases):
                # A lambda given to the writer fills the writer's own handle or temporary path
                # (atomic_write(dest, lambda handle: torch.save(payload, handle))).
                callbacks = [arg for arg in [*node.args, *(k.value for k in node.keywords)]
                             if isinstance(arg, ast.Lambda)]
            else:
                call = _forbidden(node, aliases)
                if call is not None:
                    found.append(Finding(file, node.lineno, function, call))
        for child in ast.iter_child_nodes(node):
            if child not in callbacks:
                visit(child, function)

    visit(tree, "<module>")
    return found


def lint_tree(root: Path = ROOT) -> list[Finding]:
    found: list[Finding] = []
    for prefix, folder in (("moefast", root / "moefast"), ("moefast.kernels", root / "kernels")):
        for path in sorted(folder.rglob("*.py")):
            file = path.relative_to(root).as_posix()
            if file == WRITER:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            module = ".".join([prefix, *parts])
            found += lint_source(path.read_text(), file, module)
    return found


def test_every_file_is_written_by_the_one_writer() -> None:
    found = lint_tree()
    breaches = [str(f) for f in found if (f.file, f.function, f.call) not in ALLOWED]
    assert breaches == [], "write through moefast.runs.writer (or list the exception in ALLOWED):\n" + "\n".join(
        breaches)
    used = {(f.file, f.function, f.call) for f in found}
    assert sorted(set(ALLOWED) - used) == [], "allowed exceptions that no longer match anything"
    assert all(reason for reason in ALLOWED.values())


PLANTED = '''
import io, os, shutil, tempfile, gzip
import numpy as np
import torch
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib.format import open_memmap
from pyarrow import csv as pacsv
from pathlib import Path
from moefast.runs import writer
from moefast.runs.writer import write_text

def bad(path, frame, fig, array, fd):
    open(path, "w")
    open(path, mode="ab")
    Path(path).open("r+")
    gzip.open(path, "wt")
    os.fdopen(fd, "wb")
    os.open(path, os.O_WRONLY | os.O_CREAT)
    Path(path).write_text("x")
    path.write_bytes(b"x")
    os.replace(path, "b")
    os.rename(path, "b")
    path.replace("b")
    path.rename("b")
    shutil.copyfile(path, "b")
    shutil.move(path, "b")
    tempfile.mkstemp()
    np.savez(path, a=array)
    np.save(path, array)
    torch.save({}, path)
    torch.export.save(None, path)
    frame.to_csv(path)
    frame.to_parquet(path=path)
    pq.write_table(frame, path)
    pacsv.write_csv(frame, path)
    fig.savefig(path)
    array.tofile(path)
    atomic_write(path, lambda handle: torch.save({}, handle))
    np.memmap(path, dtype="f4", mode="w+", shape=(3,))
    np.memmap(path, "f4")
    np.memmap(path, "f4", mode)
    open_memmap(path, "w+", dtype="f4", shape=(3,))
    np.lib.format.open_memmap(path)
    pa.OSFile(path, "wb")
    pa.OSFile(path, mode=mode)
    pa.output_stream(path)
    io.FileIO(path, "w")
    io.FileIO(path, mode)
    Path(path).open(mode)
    path.open(mode, encoding="utf-8")
    open(path, mode)

def fine(path, frame, text):
    np.memmap(path, dtype="f4", mode="r")
    np.memmap(path, "f4", "c")
    open_memmap(path, mode="r")
    pa.OSFile(path)
    pa.OSFile(path, "rb")
    io.FileIO(path)
    Path(path).open("rb", encoding=None)
    open(path)
    open(path, "rb")
    Path(path).open()
    os.open(path, os.O_RDONLY)
    text.replace("a", "b")
    frame.rename(columns={"a": "b"})
    frame.to_csv(index=False)
    writer.atomic_write(path, lambda handle: handle.write(b"x"))
    writer.atomic_write(path, lambda handle: torch.save({}, handle))
    writer.write_at_path(path, lambda tmp: torch.export.save(None, tmp))
    write_text(path, "x")
    shutil.rmtree(path)
'''


def test_the_lint_catches_planted_writers_and_passes_harmless_calls() -> None:
    found = lint_source(PLANTED, "planted.py", "moefast.planted")
    assert {f.function for f in found} == {"bad"}, [str(f) for f in found if f.function != "bad"]
    lines = PLANTED.splitlines()
    first = next(i for i, line in enumerate(lines, 1) if line.startswith("def bad"))
    last = next(i for i, line in enumerate(lines, 1) if line.startswith("def fine"))
    expected = [i for i in range(first + 1, last) if lines[i - 1].strip()]
    assert sorted(f.line for f in found) == expected, [str(f) for f in found]
    assert {f.call for f in found} >= {"open", ".open", "gzip.open", "os.fdopen", "os.open", ".write_text",
                                       "os.replace", ".replace", ".rename", "shutil.copyfile", "numpy.savez",
                                       "torch.save", "torch.export.save", ".to_csv", "pyarrow.parquet.write_table",
                                       "pyarrow.csv.write_csv", ".savefig", ".tofile", "numpy.memmap",
                                       "numpy.lib.format.open_memmap", "pyarrow.OSFile", "pyarrow.output_stream",
                                       "io.FileIO"}


# Files the commands leave without the writer, on purpose (ALLOWED above): the run marker and the
# lock files (a grid's, a claims table's ``.<name>.lock``), opened for their flock and the
# marker written in place through the descriptor that holds it.
UNLOGGED = re.compile(r"^\.moefast-run$|^\.moefast-grid$|^\..*\.lock$")


def test_every_file_the_commands_leave_went_through_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train``, ``grid``, ``reproduce``, ``export`` and ``predict`` (tiny) with the writer's
    test log on: every file in their output folders (and the data cache) is in the log."""
    from moefast import cli

    log = tmp_path / "writes.log"
    out = tmp_path / "out"
    monkeypatch.setenv(WRITE_LOG_ENV, str(log))
    monkeypatch.setenv("MOEFAST_CACHE", str(out / "cache"))
    # A tabular source, so that the run leaves vocab.json and the data cache too.
    rows = ["click,site,user,price"] + [f"{(i * 7) % 3 == 0:d},{'abc'[i % 3]},u{(i * 5) % 23},{i % 17}.5"
                                        for i in range(300)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "schema.toml").write_text('label = "click"\ndim = 4\n[domain]\ncolumn = "site"\n'
                                          '[categorical.user]\n[numeric.price]\n')
    data = ["--preset", "paper", "--rows", "400", "--num-domains", "2"]
    run = out / "train"
    commands = [
        ["train", "--dataset", "table", "--data", str(tmp_path / "log.csv"), "--schema",
         str(tmp_path / "schema.toml"), "--method", "base", "--max-epochs", "1", "--batch-size", "128",
         "--out", str(run)],
        ["grid", *data, "--model", "wdl", "--method", "base", "--seeds", "3", "--max-epochs", "1",
         "--batch-size", "256", "--out", str(out / "grid")],
        ["reproduce", "--sections", "core", "--seeds", "1", "--rows", "800", "--budget", "converged",
         "--max-steps", "2", "--variants", "base", "--out", str(out / "claims")],
        ["export", str(run), "--method", "base", "--out", str(out / "export" / "model.pt2")],
        ["predict", "--model", str(out / "export" / "model.pt2"), "--split", "val",
         "--out", str(out / "predict" / "scores.parquet")],
        ["predict", "--model", str(run), "--unmerged", "--out", str(out / "predict" / "scores.csv")],
    ]
    for argv in commands:
        assert cli.main([*argv, "--quiet"]) == 0, (argv, capsys.readouterr().err)
    written = set(log.read_text().splitlines())
    on_disk = {str(p.resolve()) for p in out.rglob("*") if p.is_file() and not UNLOGGED.match(p.name)}
    for folder in ("train", "grid", "claims", "export", "predict"):  # each command left files
        assert any(p.startswith(str((out / folder).resolve()) + "/") for p in on_disk), folder
    names = {Path(p).name for p in on_disk}
    assert {"vocab.json", "dataset.json", "model.pt2", "model.pt2.json", "scores.parquet"} <= names, names
    assert any(p.endswith(".npz") for p in on_disk), "the data cache was not written"
    assert sorted(on_disk - written) == [], "files left without the writer"
    from moefast.experiments.grid import LOCK_FILE
    from moefast.runs.rundir import MARKER

    assert UNLOGGED.match(MARKER) and UNLOGGED.match(LOCK_FILE)  # the names above are still these
    assert not [p for p in out.rglob("*.tmp")], "temporary files left behind"
