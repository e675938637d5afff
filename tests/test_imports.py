"""The shape of the package's imports: the library never imports its command line, has no import cycles, and
``import qkhooks`` loads neither the CLI nor the analyses (nor ``argparse`` on qkhooks' behalf).

The graph is built from the source with ``ast`` (no import executed): an edge A -> B for every import of a qkhooks
module B at module level of A (top-level statements, ``try``/``if`` blocks included, ``if TYPE_CHECKING:`` left
out, function bodies left out: they run later, when every module is loaded). The target of ``from a.b import c`` is
``a.b.c`` when that is a module, else ``a.b``; importing a submodule also runs its packages' ``__init__``, but a
package re-exporting its submodules is not a cycle Python trips over, so those implicit edges are not drawn.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qkhooks"

CLI_PENDING = {"qkhooks.analysis.preference", "qkhooks.analysis.modes", "qkhooks.analysis.bfd", "qkhooks.bench"}
"""Library modules that still register their own commands on this branch; their commands move to qkhooks/cli/ in
the branches "recipes" (analysis) and "bench-size" (bench). TODO(lead): empty this set at merge."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (not in functions, classes' methods or TYPE_CHECKING)."""
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
                for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                    walk(block)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                walk(node.body)

    walk(tree.body)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The qkhooks modules one import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    base = node.module or ""
    if node.level:  # relative import
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES:
            out.add(sub)
        elif base in MODULES:
            out.add(base)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {t for node in _top_level_imports(tree) for t in _targets(name, node)} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_names_it():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_the_graph_sees_module_level_imports_only():
    tree = ast.parse(textwrap.dedent("""
        from typing import TYPE_CHECKING
        import qkhooks.errors
        try:
            from qkhooks.store import format as fmt
        except ImportError:
            pass
        if TYPE_CHECKING:
            from qkhooks.capture import Recording
        def f():
            from qkhooks.stream import record_dataset
    """))
    found = {t for node in _top_level_imports(tree) for t in _targets("qkhooks.report", node)}
    assert found == {"qkhooks.errors", "qkhooks.store.format"}


def test_no_import_cycles_between_qkhooks_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _imports_anywhere(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names that can run: in function bodies too, not under
    ``if TYPE_CHECKING:``."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


def test_the_library_never_imports_its_command_line():
    offenders = sorted(name for name, path in MODULES.items()
                       if not (name == "qkhooks.cli" or name.startswith("qkhooks.cli.") or name == "qkhooks.__main__")
                       and name not in CLI_PENDING
                       and any(m == "qkhooks.cli" or m.startswith("qkhooks.cli.") for m in _imports_anywhere(path)))
    assert offenders == [], f"library modules importing qkhooks.cli: {offenders}"


def test_only_the_command_line_imports_argparse():
    offenders = sorted(name for name, path in MODULES.items()
                       if not name.startswith("qkhooks.cli") and name not in CLI_PENDING
                       and "argparse" in _imports_anywhere(path))
    assert offenders == [], f"library modules importing argparse: {offenders}"


IMPORT_QKHOOKS = textwrap.dedent("""
    import sys
    import qkhooks
    argparse = sys.modules.get("argparse")  # torch imports it itself: that is not qkhooks'
    holders = sorted(name for name, module in list(sys.modules.items()) if name.startswith("qkhooks") and argparse
                     and any(value is argparse or getattr(value, "__module__", None) == "argparse"
                             for value in vars(module).values()))
    print("argparse held by", holders)
    print("loaded", sorted(m for m in sys.modules if m.startswith(("qkhooks.cli", "qkhooks.analysis"))))
""")


def test_import_qkhooks_loads_no_cli_no_analysis_and_no_argparse_of_its_own():
    out = subprocess.run([sys.executable, "-c", IMPORT_QKHOOKS], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert "loaded []" in out, out
    assert "argparse held by []" in out, out
