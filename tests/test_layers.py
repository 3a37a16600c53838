"""Layering: Prefect only in flows/, and nothing imports flows/ (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("retroflow", "retromae", "retrieval", "eval")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_library_packages_never_import_prefect_or_flows():
    offenders = []
    for package in LIBRARY:
        for path in sorted((REPO / package).rglob("*.py")):
            for name in imported_modules(path):
                if name.split(".")[0] in ("prefect", "prefect_dask", "prefect_ray", "flows"):
                    offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, offenders
    assert imported_modules(REPO / "flows" / "tasks.py") & {"prefect"}  # the check sees imports at all
