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
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qkhooks"



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
                       and any(m == "qkhooks.cli" or m.startswith("qkhooks.cli.") for m in _imports_anywhere(path)))
    assert offenders == [], f"library modules importing qkhooks.cli: {offenders}"


def test_only_the_command_line_imports_argparse():
    offenders = sorted(name for name, path in MODULES.items()
                       if not name.startswith("qkhooks.cli")
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


INFO_PATH = ("qkhooks.cli", "qkhooks.cli.spectrum", "qkhooks.cli.record", "qkhooks.cli.run_files", "qkhooks.store.reader")
"""What ``qkhooks info`` imports: the command modules listed up to its own (qkhooks.cli stops there), and the reader."""


def test_the_modules_qkhooks_info_loads_import_no_torch_at_module_level():
    from qkhooks.cli import COMMAND_MODULES

    assert COMMAND_MODULES[:3] == INFO_PATH[1:4]  # info's module, and the command modules loaded before it
    graph = import_graph()
    seen, todo = set(), list(INFO_PATH)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    heavy = {module: sorted(names) for module in sorted(seen)
             if (names := {a.name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "").split(".")[0]
                           for node in _top_level_imports(ast.parse(MODULES[module].read_text()))
                           for a in node.names} & {"torch", "timm", "transformers", "torchvision"})}
    assert heavy == {}, f"modules on the path of `qkhooks info` import at module level: {heavy}"


def test_a_command_loads_the_command_modules_up_to_its_own_and_help_loads_all(tmp_path):
    script = textwrap.dedent("""
        import sys
        from qkhooks.cli import COMMAND_MODULES, main
        try:
            main(sys.argv[1:])
        finally:  # argparse exits after --help
            print("loaded", [m for m in COMMAND_MODULES if m in sys.modules])
    """)
    from qkhooks.cli import COMMAND_MODULES

    def loaded(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(PACKAGE.parent)))
        return next(line for line in done.stdout.splitlines() if line.startswith("loaded"))

    assert loaded("info", "missing.h5") == f"loaded {list(COMMAND_MODULES[:3])}"
    assert loaded("--help") == loaded("no-such-command") == f"loaded {list(COMMAND_MODULES)}"


HIDE_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class HideTorch(importlib.abc.MetaPathFinder):
        # As if torch, timm and transformers were not installed.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "timm", "transformers", "torchvision"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideTorch())
""")


def without_torch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in a subprocess where torch, timm and transformers cannot be imported."""
    hide = tmp_path / "hide_torch"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(HIDE_TORCH)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), str(PACKAGE.parent)]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_qkhooks_info_prints_the_summary_where_torch_is_not_installed(tmp_path):
    import timm

    import qkhooks

    torch_hidden = without_torch(tmp_path, "-c", "import torch")
    assert "No module named 'torch'" in torch_hidden.stderr  # the hiding works
    model = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=32, embed_dim=32, depth=2,
                              num_heads=4).eval()
    run = tmp_path / "run.h5"
    qkhooks.record_dataset(qkhooks.load_model(model), "o3:3:1", run, modes=4, attention="rows", progress=False)
    with qkhooks.open_run(run) as reader:
        expected = reader.summary()
    info = without_torch(tmp_path, "-m", "qkhooks", "info", str(run))
    assert info.returncode == 0, info.stderr
    assert info.stdout.strip() == expected.strip()


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, which the graph above leaves out: a
    module taking a name from one whose import is still under way only shows here."""
    script = "import importlib, sys; importlib.import_module(sys.argv[1])"
    failed = {}
    for name in MODULES:
        if name == "qkhooks.__main__":  # runs the command line
            continue
        done = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True,
                              cwd=PACKAGE.parent, env=dict(os.environ, PYTHONPATH=str(PACKAGE.parent)))
        if done.returncode:
            failed[name] = done.stderr.strip().splitlines()[-1]
    assert failed == {}


def test_a_command_module_missing_torch_is_left_out_and_asking_for_its_command_says_why(tmp_path, monkeypatch, capsys):
    import qkhooks.cli as cli

    (tmp_path / "needs_torch_cmds.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    (tmp_path / "broken_cmds.py").write_text("import no_such_package_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("needs_torch_cmds", *cli.COMMAND_MODULES))
    assert cli.main(["needs-torch", "x"]) == 2
    assert "torch is not installed (needed by needs_torch_cmds)" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "missing.h5")]) == 2  # the other commands still run
    assert "missing.h5" in capsys.readouterr().err
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("broken_cmds", *cli.COMMAND_MODULES))
    with pytest.raises(ModuleNotFoundError, match="no_such_package_anywhere"):  # a real error is not hidden
        cli.main(["no-such-command"])
