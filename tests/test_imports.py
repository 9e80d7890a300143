"""The package's import structure: no import cycles, and the layers import in one direction only.

Every module under src/textclass is parsed with `ast` (nothing is imported): imports at module top and
inside functions or classes count, absolute (`import textclass.x`, `from textclass.x import y`) and
relative (`from . import y`, `from ..x import y`), and `importlib.import_module(...)`: with a literal name
that module; with a computed name, every module of ours that the file names in a string literal (the
registry's `for module in _FAMILY_MODULES: importlib.import_module(module)`). `from textclass.a import b`
is an import of `textclass.a.b` when `b` is a submodule, else of `textclass.a` (so `from textclass.serve
import ServeSettings` imports the package `textclass.serve`). Imports under `if TYPE_CHECKING:` never run
and are left out.

A lazy import inside a function still closes a cycle: the two modules can then only be understood, tested
and refactored together, and which one is half-initialised depends on which a caller imported first. The
one accepted exception is the model registry importing its families inside a function (the families
register themselves by importing the registry).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "textclass"

# The one accepted cycle: `registry.get_family` imports the family modules lazily; they import the registry.
REGISTRY = "textclass.models.registry"
FAMILY_PACKAGES = ("textclass.models.encoder", "textclass.models.llm", "textclass.models.small")

# (importer package, imported package, known violation reason or None): the importer must not import it.
LAYERS: list[tuple[str, str, str | None]] = [
    ("textclass.training", "textclass.inference", None),
    ("textclass.inference", "textclass.training", None),
    ("textclass.export", "textclass.training", None),
    ("textclass.serve", "textclass.training", None),
]


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    lazy: bool  # inside a function (runs when called, not when the module is imported)

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} (line {self.line}{', in a function' if self.lazy else ''})"


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, name: str | None, level: int) -> str:
    """The absolute module named by `from <level dots><name> import ...` inside `module`."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]  # a plain module's package
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _known(name: str) -> str | None:
    """`name` if it is one of our modules, else its closest parent that is (`textclass.a.B` -> `textclass.a`)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, tree: ast.Module) -> None:
        self.module = module
        self.literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        self.depth = 0  # function nesting
        self.edges: list[Edge] = []

    def _add(self, target: str | None, node: ast.AST) -> None:
        if target and target != self.module:
            self.edges.append(Edge(self.module, target, node.lineno, self.depth > 0))  # type: ignore[attr-defined]

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # the `else:` of `if TYPE_CHECKING` does run
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                self._add(_known(alias.name), node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, node.module, node.level)
        if base.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in MODULES else _known(base), node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                targets = [str(arg.value)]
            else:  # a computed name: any of our modules this file spells out may be the one imported
                targets = [n for n in self.literals if n in MODULES]
            for target in targets:
                if target.split(".")[0] == PACKAGE:
                    self._add(_known(target), node)
        self.generic_visit(node)


def import_edges() -> list[Edge]:
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visitor = _Imports(module, tree)
        visitor.visit(tree)
        edges.extend(visitor.edges)
    return sorted(set(edges), key=lambda e: (e.importer, e.imported, e.line))


def _accepted(edge: Edge) -> bool:
    """The registry's lazy import of its families."""
    return (
        edge.importer == REGISTRY
        and edge.lazy
        and any(edge.imported == f or edge.imported.startswith(f + ".") for f in FAMILY_PACKAGES)
    )


def import_cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in edges:
        graph[e.importer].add(e.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def _describe(component: list[str], edges: list[Edge]) -> str:
    inside = set(component)
    lines = [str(e) for e in edges if e.importer in inside and e.imported in inside]
    return "cycle " + " <-> ".join(component) + ":\n    " + "\n    ".join(lines)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


EDGES = [e for e in import_edges() if not _accepted(e)]


def test_the_parser_sees_every_kind_of_import() -> None:
    """Guards the checks below against a parser that silently finds nothing."""
    found = {(e.importer, e.imported, e.lazy) for e in import_edges()}
    assert ("textclass.api", "textclass.config", False) in found  # from textclass.config import ...
    assert ("textclass", "textclass.api", True) in found  # from textclass import api, inside __getattr__
    assert ("textclass.cli", "textclass.serve", True) in found  # from textclass.serve import ServeSettings
    assert (REGISTRY, "textclass.models.encoder", True) in found  # the registry's lazy family import
    assert ("textclass.data.builtin", "textclass.errors", False) in found
    assert len(MODULES) > 40


def test_the_registry_exception_is_only_lazy() -> None:
    """The accepted cycle stays lazy: a module-level import of a family by the registry is a plain cycle."""
    assert any(_accepted(e) for e in import_edges())
    eager = [str(e) for e in import_edges() if e.importer == REGISTRY and not e.lazy and not _accepted(e)
             and any(_in(e.imported, f) for f in FAMILY_PACKAGES)]
    assert not eager, eager


def test_no_import_cycles() -> None:
    """No cycle apart from the registry's lazy family imports."""
    cycles = import_cycles(EDGES)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, EDGES) for c in cycles)


@pytest.mark.parametrize(
    "importer, imported",
    [
        pytest.param(a, b, id=f"{a}-must-not-import-{b}",
                     marks=[pytest.mark.xfail(strict=True, reason=reason)] if reason else [])
        for a, b, reason in LAYERS
    ],
)
def test_layering(importer: str, imported: str) -> None:
    """Direct imports, at module top or in a function."""
    bad = [str(e) for e in EDGES if _in(e.importer, importer) and _in(e.imported, imported)]
    assert not bad, f"{importer} imports {imported}:\n  " + "\n  ".join(bad)
