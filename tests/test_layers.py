"""The import rules of docs/architecture.md: each package imports only the layers below it.

    flows/                       the chain, the CLI, the Prefect wiring (the only Prefect user)
    eval/                        evaluate, report, registry, compare
    retromae/    retrieval/      the stage packages (they do not import each other)
    retroflow/                   foundation: config, artifacts, IO/hashing, models, data readers, training loop

Lazy imports inside functions count too: the walk sees every `import` node.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "retroflow": {"retroflow"},
    "retromae": {"retroflow", "retromae"},
    "retrieval": {"retroflow", "retrieval"},
    "eval": {"retroflow", "retrieval", "eval"},
    "flows": {"retroflow", "retromae", "retrieval", "eval", "flows"},
}
PREFECT = {"prefect", "prefect_dask", "prefect_ray"}


def imported_modules(source: str, filename: str = "<source>") -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def back_arrows(package: str, source: str, filename: str) -> list[str]:
    """Imports of `source` (a file of `package`) that break the layering."""
    found = []
    for name in sorted(imported_modules(source, filename)):
        top = name.split(".")[0]
        if top in ALLOWED and top not in ALLOWED[package]:
            found.append(f"{filename} imports {name} ({package} may import only {', '.join(sorted(ALLOWED[package]))})")
        if top in PREFECT and package != "flows":
            found.append(f"{filename} imports {name} (Prefect belongs in flows/)")
    return found


def test_every_package_imports_only_the_layers_below_it():
    offenders = []
    for package in ALLOWED:
        for path in sorted((REPO / package).rglob("*.py")):
            offenders += back_arrows(package, path.read_text(), str(path.relative_to(REPO)))
    assert not offenders, "\n".join(offenders)


def test_a_new_back_arrow_fails_the_check():
    # what a regression would look like: the foundation reaching up into a stage, a stage into the chain
    assert back_arrows("retroflow", "def f():\n    from eval.evaluate import evaluate\n", "retroflow/x.py") == [
        "retroflow/x.py imports eval.evaluate (retroflow may import only retroflow)"
    ]
    assert back_arrows("retrieval", "import flows.chain\n", "retrieval/x.py")
    assert back_arrows("retromae", "from retrieval.encoder import Encoder\n", "retromae/x.py")  # siblings stay apart
    assert back_arrows("eval", "import prefect\n", "eval/x.py") == ["eval/x.py imports prefect (Prefect belongs in flows/)"]
    assert back_arrows("flows", "import prefect\nfrom eval.report import metric_rows\n", "flows/x.py") == []
    # and the real tree is read: flows/tasks.py is seen importing Prefect
    assert "prefect" in imported_modules((REPO / "flows" / "tasks.py").read_text())


def test_the_chain_and_the_cli_run_without_prefect():
    """`retroflow pipeline` and the stage commands must work where Prefect is absent or broken."""
    import subprocess
    import sys

    probe = "import sys, flows.cli, flows.chain, flows.stages; print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
