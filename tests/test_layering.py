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
