"""The package layout holds: rooms import only the same or lower rooms, no import circle, no
file over 450 lines, no function over 60."""

from __future__ import annotations

import ast
import pathlib

import networkx as nx

PKG = pathlib.Path(__file__).resolve().parents[1] / "bnrewrite"
MAX_FILE, MAX_FUNCTION = 450, 60

# Lowest first. A module may import from its own room and from rooms listed before it.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "diagnostics", "catalogue", "codes", "runtime", "modules", "files", "progress", "select", "stash",
              "precision")),
    ("semantics", ("semantics",)),  # what a node computes
    ("capture", ("capture",)),  # how a model becomes graphs
    ("local checks", ("local_checks", "layer_check")),  # what the proof compares, per edit
    ("editor", ("editor",)),  # edits that land in the user's tree
    ("plan", ("plan",)),  # where every BatchNorm goes, and why not
    ("rewrite rules", ("rewrite_rules",)),  # one fold kind per file
    ("driver", ("driver", "lint", "structure")),  # the rules to a fixed point; lint rules
    ("proof", ("verify", "proof", "weight_precision", "precision_report", "graph_svg", "graph_files", "plot_ranges", "render",
               "sarif")),
    ("api", ("fold", "analyze", "equalize", "equalize_pairs", "surgery", "recalibrate", "calibration", "checkpoint", "load",
             "export", "config", "pipeline")),
    ("cli", ("cli", "__main__", "")),
]  # fmt: skip


def _room(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, (_name, members) in enumerate(ROOMS):
        if top in members:
            return i
    raise AssertionError(f"{module} is in no room: add it to ROOMS")


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Every import that runs (module level or in a function), not those under TYPE_CHECKING."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def _targets(node: ast.ImportFrom | ast.Import, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("bnrewrite")]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    if not base.startswith("bnrewrite"):
        return []
    out, plain = [], False
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() or (
            PKG.parent / sub.replace(".", "/")
        ).is_dir():
            out.append(sub)
        else:
            plain = True
    return [*out, base] if plain else out


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in PKG.rglob("*.py"):
        module = _module(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        g.add_node(module)
        for node in _runtime_imports(ast.parse(path.read_text())):
            for target in _targets(node, package):
                if target != module:
                    g.add_edge(module, target)
    return g


def test_no_import_circle():
    cycles = [c for c in nx.simple_cycles(_graph()) if len(c) > 1]
    assert not cycles, cycles[:5]


def test_rooms_import_only_downward():
    wrong = [
        f"{a} ({ROOMS[_room(a)][0]}) imports {b} ({ROOMS[_room(b)][0]})"
        for a, b in _graph().edges
        if _room(b) > _room(a)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_file_over_450_lines():
    long = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_FILE
    }
    assert not long, long


def test_no_function_over_60_lines():
    long = [
        f"{p.relative_to(PKG)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for p in PKG.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION
    ]
    assert not long, long


def test_the_checks_catch_what_they_must(tmp_path):
    """Planted: a circle and an upward import are found; a downward import is spared."""
    g = nx.DiGraph(
        [("bnrewrite.semantics.ops", "bnrewrite.fold"), ("bnrewrite.fold", "bnrewrite.semantics.ops")]
    )
    assert [c for c in nx.simple_cycles(g) if len(c) > 1]
    assert _room("bnrewrite.fold") > _room("bnrewrite.semantics.ops")
    assert _room("bnrewrite.editor.bind") > _room("bnrewrite.local_checks")
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bnrewrite.fold import fold\n"
    )
    assert not [t for n in _runtime_imports(tree) for t in _targets(n, "bnrewrite.semantics")]
