"""The packages depend one way: depgraph (graph, surgery) <- modelio (load, save) <- pruners (the engine)
<- recover."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# a package may import only those below it; the command lines (hf_prune.py, __main__) sit above everything
BELOW = {"depgraph": set(), "modelio": {"depgraph"}, "pruners": {"depgraph", "modelio", "corpora", "evaluation"},
         "recover": {"depgraph", "modelio", "corpora", "evaluation", "pruners"}}


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(BELOW))
def test_packages_import_only_those_below_them(package):
    others = set(BELOW) - {package}
    for path in sorted((ROOT / package).glob("*.py")):
        if path.name == "__main__.py":
            continue
        wrong = (_imported_packages(path) & others) - BELOW[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}, which sit above {package}"
