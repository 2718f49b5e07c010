"""The package's import graph: no module of src/kvcake takes part in an import cycle.

A module-level import runs when the module is first imported, so a cycle among them makes the result depend on
which module is imported first (a half-initialised module, a missing name). The graph is read from the source with
:mod:`ast`: imports inside functions (run later, on call) and under ``if TYPE_CHECKING:`` (never run) are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kvcake

ROOT = Path(kvcake.__file__).resolve().parent


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: at top level, in class bodies and in ``if``,
    ``try`` and ``with`` blocks, but not in functions nor under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    walk(block)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                walk(node.body)

    walk(tree.body)
    return found


def edges(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports at module level."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in module_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.add(sub if sub in known else base)  # `from pkg import module` or `from module import name`
    return {t for t in targets if t in known and t != name}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: edges(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; a module that imports
    itself is not counted (``edges`` drops it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_cycles_and_skips_deferred_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom pkg.d import thing\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n"
                              "def f():\n    from pkg import e\nthing = 1\n")
    (pkg / "e.py").write_text("import pkg.d\nclass E:\n    import os\n")
    g = graph(pkg)
    assert g["pkg.a"] == {"pkg.b"} and g["pkg.b"] == {"pkg.sub.c"} and g["pkg.sub.c"] == {"pkg.a", "pkg.d"}
    assert g["pkg.d"] == set() and g["pkg.e"] == {"pkg.d"}
    assert cycles(g) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_no_import_cycle_in_the_package():
    g = graph()
    assert "kvcake.eval.runner" in g and "kvcake.eval.suites.ruler" in g  # the reader found the package
    assert cycles(g) == []


def test_metrics_need_no_other_import_to_be_complete():
    """Importing the metrics table alone gives every metric a suite names (no registration by side effect)."""
    code = ("from kvcake.eval.metrics import METRICS; have = set(METRICS); from kvcake.eval.suites import longbench; "
            "names = {t.metric for t in longbench.TASKS.values()} | {'needlebench', 'needlebench_multi', "
            "'string_match_all', 'string_match_part'}; print(sorted(names - have))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"
