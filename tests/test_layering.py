"""The packages' dependency direction: ``proposals`` and ``eval`` import nothing of the project but themselves.

Read from the source with ``ast`` (every ``import`` and ``from ... import``, also those inside functions), so a
lazy import counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what each package may import of the others; nothing imports service
MAY_IMPORT = {
    "proposals": (),  # MultiBox takes its trunk as a module, built by the bundle code in detector
    "eval": (),  # it scores files
    "detector": ("proposals", "eval"),  # a detector takes proposals; the class tables live in eval
    "service": ("detector", "proposals", "eval"),
}


def imported_packages(file: Path) -> set[str]:
    """The project's top-level packages that ``file`` imports (relative imports stay inside its package)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in MAY_IMPORT)
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_what_it_may(package):
    wrong = {}
    for file in sorted((ROOT / package).rglob("*.py")):
        name = file.relative_to(ROOT).as_posix()
        others = sorted(imported_packages(file) - {package, *MAY_IMPORT[package]})
        if others:
            wrong[name] = others
    assert wrong == {}, f"{package} may import only {list(MAY_IMPORT[package]) or 'itself'} of the project"


def test_the_check_sees_imports_anywhere_in_a_file(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("import os\nfrom . import sibling\n\ndef f():\n    from detector.bundle import Bundle\n"
                    "    import service.cli as cli\n    import proposalsx\n")
    assert imported_packages(file) == {"detector", "service"}


# ---- modules: no import cycle, counting imports inside functions ---------------------------------------------


def module_name(file: Path, root: Path = ROOT) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(file: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The project's modules that ``file`` imports anywhere in it (``from a.b import c`` imports module ``a.b.c``
    when that is a module, else ``a.b``; relative imports resolved)."""
    own = module_name(file, root)
    package = own if file.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found - {own}


def import_graph(root: Path, packages) -> dict[str, set[str]]:
    files = {module_name(f, root): f for package in packages for f in sorted((root / package).rglob("*.py"))}
    return {name: module_imports(file, set(files), root) for name, file in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    assert cycles(import_graph(ROOT, MAY_IMPORT)) == []


def test_the_cycle_check_sees_a_cycle_through_a_function_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    assert cycles(import_graph(tmp_path, ["pkg"])) == [["pkg.a", "pkg.b", "pkg.c"]]


MAX_LINES = 600


def test_no_source_file_is_over_600_lines():
    long = {f.relative_to(ROOT).as_posix(): n for package in MAY_IMPORT
            for f in (ROOT / package).rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_package_is_installed():
    """pyproject.toml lists the packages to install one by one: a new subpackage left out of it imports in the
    checkout (editable install) and fails in a real one (Docker, a wheel)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(f.parent) for package in MAY_IMPORT for f in (ROOT / package).rglob("__init__.py")}
    assert found - listed == set()
