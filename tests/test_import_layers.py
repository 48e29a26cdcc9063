"""The library's import graph, read from the source (AST): no circle between modules, and the bottom layers
(`model/`, `int4/`) import nothing from the layers above them (`quant/`, `deploy/`, `calib/`, `evals/`).

Every import counts, those inside functions too: a deferred import hides a circle from the interpreter,
not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each package's source lives (pyproject's package-dir).
PACKAGE_DIRS = {"r1v_quant": ROOT / "r1v_quant", "r1v_quant.calib": ROOT / "calib", "r1v_quant.cli": ROOT / "cli",
                "r1v_quant.evals": ROOT / "evals"}
BOTTOM = ("r1v_quant.model", "r1v_quant.int4")
ABOVE_BOTTOM = ("r1v_quant.quant", "r1v_quant.deploy", "r1v_quant.calib", "r1v_quant.evals")


def library_modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the installed package."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if package == "r1v_quant" and rel.parts[0] in ("calib", "cli", "evals", "data"):
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join((package, *parts))] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The library modules `name` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports between modules (package __init__ files are modules too), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue   # a package's __init__ naming its own modules is no circle
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_covers_the_library():
    graph = import_graph()
    assert {"r1v_quant.deploy.serve", "r1v_quant.model.footprint", "r1v_quant.calib.chains", "r1v_quant.cli.main",
            "r1v_quant.evals.run", "r1v_quant.synthetic.checkpoint"} <= set(graph)
    assert "r1v_quant.deploy.compromises" in graph["r1v_quant.deploy.plan"]


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_bottom_layers_import_nothing_above_them():
    graph = import_graph()
    wrong = sorted(f"{m} imports {t}" for m, targets in graph.items() if m.startswith(BOTTOM)
                   for t in targets if t.startswith(ABOVE_BOTTOM))
    assert wrong == []


def test_nothing_in_the_library_imports_test_or_training_code():
    graph = import_graph()
    assert not any(t.startswith("helpers") or "train" in t.rpartition(".")[2] for ts in graph.values() for t in ts)
    sources = "\n".join(p.read_text() for p in library_modules().values())
    for outside in ('"models"', "'models'", "parents[2]", "tests/helpers"):
        assert outside not in sources, f"the library refers to {outside}, outside the installed package"


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "p": {"p.x"}, "p.x": set()}) is None
