"""The package's import graph has no cycle.

Edges are every ``import`` / ``from ... import`` in a module of ``moefast`` (``kernels/`` as
``moefast.kernels``), at module level or inside functions and classes, leaving out the bodies of
``if TYPE_CHECKING:``. ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else
to ``a.b``; the parent packages Python runs first are not counted as edges (every submodule
would otherwise form a cycle with a package ``__init__`` that imports it).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    found: dict[str, pathlib.Path] = {}
    for prefix, folder in (("moefast", root / "moefast"), ("moefast.kernels", root / "kernels")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.Module, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``tree`` imports anywhere, TYPE_CHECKING bodies left out."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                names.add(submodule if submodule in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return (names & modules) - {module}


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    modules = _modules(root)
    return {
        module: _imported(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py", set(modules))
        for module, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := dfs(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "moefast.cli.train" in graph["moefast.cli"], "the graph builder lost the CLI's edges"
    assert "moefast.runs.rundir" in graph["moefast.train.loop"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_graph_builder_sees_cycles_through_functions_but_not_type_checking() -> None:
    """The builder on small made-up modules: a function-level import closes a cycle, a
    TYPE_CHECKING one does not."""
    source = {
        "moefast.a": "from moefast.b import f\n",
        "moefast.b": "def f():\n    from moefast import a\n    return a\n",
        "moefast.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moefast.a import x\n",
    }
    graph = {m: _imported(ast.parse(s), m, False, set(source)) for m, s in source.items()}
    assert graph == {"moefast.a": {"moefast.b"}, "moefast.b": {"moefast.a"}, "moefast.c": set()}
    assert find_cycle(graph) == ["moefast.a", "moefast.b", "moefast.a"]
    assert find_cycle({"moefast.a": {"moefast.b"}, "moefast.b": set()}) is None


# The layers (issue 25; each package's docstring says the same): the left side never imports a
# module that starts with any prefix on the right. The aliases left at the old paths
# (``moefast.train.rundir`` and the like, until the end of wave 3) are not layers of their own.
ALIASES = {f"moefast.train.{name}" for name in ("atomic", "rundir", "checkpoint", "resume", "grid", "claims",
                                                  "distributed")}
LAYERS = {
    "moefast.data": ("moefast.models", "moefast.nn", "moefast.ops", "moefast.train", "moefast.runs",
                     "moefast.experiments", "moefast.export", "moefast.cli"),
    "moefast.runs": ("moefast.train", "moefast.experiments", "moefast.cli"),
    "moefast.train": ("moefast.experiments", "moefast.cli"),
    "moefast.train.parallel": ("moefast.train.loop",),
    "moefast.models": ("moefast.train", "moefast.runs", "moefast.experiments", "moefast.export", "moefast.cli"),
    "moefast.nn": ("moefast.models", "moefast.data", "moefast.train", "moefast.runs", "moefast.experiments",
                   "moefast.export", "moefast.cli"),
    "moefast.ops": ("moefast.nn", "moefast.models", "moefast.data", "moefast.train", "moefast.runs",
                    "moefast.experiments", "moefast.export", "moefast.cli"),
    "moefast.reference": ("moefast.ops", "moefast.nn", "moefast.models", "moefast.data", "moefast.train",
                          "moefast.runs", "moefast.experiments", "moefast.export", "moefast.cli"),
    "moefast.export": ("moefast.train", "moefast.experiments", "moefast.cli"),
}


# The one writer every output goes through (tests/test_one_writer.py) and the one list of a run
# directory's file names (tests/test_run_files.py) import nothing of moefast: every layer may use
# them, the data's cache and vocab.json included.
EVERY_LAYER = {"moefast.runs.writer", "moefast.runs.files"}


def _breaches(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        if module in ALIASES:
            continue
        for layer, forbidden in LAYERS.items():
            if module != layer and not module.startswith(layer + "."):
                continue
            for target in sorted(targets - ALIASES - EVERY_LAYER):
                if any(target == f or target.startswith(f + ".") for f in forbidden):
                    found.append(f"{module} -> {target}")
    # experiments sit on top: only the command line (and experiments themselves) import them; the
    # command line is the top: only itself and ``python -m moefast`` import it.
    for top, importers in (("moefast.experiments", ("moefast.experiments", "moefast.cli")),
                           ("moefast.cli", ("moefast.cli", "moefast.__main__"))):
        for module, targets in sorted(graph.items()):
            if not module.startswith(importers) and module not in ALIASES:
                found += [f"{module} -> {t}" for t in sorted(targets) if t == top or t.startswith(top + ".")]
    return found


def test_the_layers_hold() -> None:
    graph = import_graph()
    assert "moefast.runs.writer" in graph["moefast.runs.checkpoint"], "the graph builder lost the runs' edges"
    assert _breaches(graph) == []
    assert graph["moefast.runs.writer"] == set(), "the writer every layer uses must import nothing of moefast"
    assert graph["moefast.runs.files"] == set(), "the file names every layer uses must import nothing of moefast"


def test_the_layer_check_sees_a_breach() -> None:
    graph = {"moefast.runs.rundir": {"moefast.experiments.grid"}, "moefast.data.table": {"moefast.train.loop"},
             "moefast.train.loop": {"moefast.runs.rundir"}}
    assert _breaches(graph) == ["moefast.data.table -> moefast.train.loop", "moefast.runs.rundir -> moefast.experiments.grid",
                                "moefast.runs.rundir -> moefast.experiments.grid"]
