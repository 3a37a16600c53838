"""The import rules of docs/architecture.md: each package imports only the layers below it.

    flows/                       the chain, the CLI, the Prefect wiring (the only Prefect user)
    eval/                        evaluate, report, registry, compare
    retromae/    retrieval/      the stage packages (they do not import each other)
                   training/     training a retriever: negatives, teacher, fine-tuning
                   serving/      serving one: encoders, encode, BM25, index, tune, search, fusion
    retroflow/                   foundation: config, artifacts, IO/hashing, models, data readers, training loop

Inside `retrieval/`, training may import serving (negatives are mined by searching) and serving
never imports training; `eval/` evaluates what serving serves, so it imports serving only.
Lazy imports inside functions count too: the walk sees every `import` node.

Two more rules: no cycle of imports between project modules, at module level (one would fail, or
half-initialise a module, depending on which is imported first) or through imports inside
functions (two modules that need each other are one idea split in two), and only command-line modules
(`*cli.py`) import command-line modules (a stage's code key leaves them out: docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("retroflow", "retromae", "retrieval", "eval", "flows")
# layer -> the layers its modules may import. A layer is a package or a sub-package; a module
# belongs to the longest layer its name starts with, and allowing a layer allows its sub-layers.
ALLOWED = {
    "retroflow": {"retroflow"},
    "retromae": {"retroflow", "retromae"},
    "retrieval": {"retroflow", "retrieval"},  # the package itself and its command dispatcher
    "retrieval.serving": {"retroflow", "retrieval.serving"},
    "retrieval.training": {"retroflow", "retrieval.serving", "retrieval.training"},
    "eval": {"retroflow", "retrieval.serving", "eval"},
    "flows": {"retroflow", "retromae", "retrieval", "eval", "flows"},
}
PREFECT = {"prefect", "prefect_dask", "prefect_ray"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PROJECT_MODULES = {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def within(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def layer_of(module: str) -> str | None:
    """The layer `module` belongs to (None: not the project's)."""
    return max((layer for layer in ALLOWED if within(module, layer)), key=len, default=None)


def imported_modules(source: str, filename: str = "<source>") -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def back_arrows(layer: str, source: str, filename: str) -> list[str]:
    """Imports of `source` (a file of `layer`) that break the layering."""
    found = []
    for name in sorted(imported_modules(source, filename)):
        target = layer_of(name)
        if target is not None and not any(within(target, allowed) for allowed in ALLOWED[layer]):
            found.append(f"{filename} imports {name} ({layer} may import only {', '.join(sorted(ALLOWED[layer]))})")
        if name.split(".")[0] in PREFECT and layer.split(".")[0] != "flows":
            found.append(f"{filename} imports {name} (Prefect belongs in flows/)")
    return found


def test_every_package_imports_only_the_layers_below_it():
    offenders = []
    for name, path in sorted(PROJECT_MODULES.items()):
        offenders += back_arrows(layer_of(name), path.read_text(), str(path.relative_to(REPO)))
    assert not offenders, "\n".join(offenders)


def test_retrieval_holds_its_two_jobs_and_serving_never_imports_training():
    # every retrieval module but the package's own and its command dispatcher is in one of the two
    assert {name for name in PROJECT_MODULES if layer_of(name) == "retrieval"} == {"retrieval", "retrieval.cli"}
    assert layer_of("retrieval.serving.hybrid") == "retrieval.serving" and layer_of("retrieval.training") == "retrieval.training"
    # what a regression would look like: serving reaching into training, even lazily
    lazy = "def f():\n    from retrieval.training.teacher_scores import SCORES_FILE\n"
    assert back_arrows("retrieval.serving", lazy, "retrieval/serving/x.py") == [
        "retrieval/serving/x.py imports retrieval.training.teacher_scores (retrieval.serving may import only retrieval.serving, retroflow)"
    ]
    assert back_arrows("retrieval.serving", "from retrieval import training\n", "retrieval/serving/x.py")
    assert back_arrows("eval", "from retrieval.training.finetune import FinetuneConfig\n", "eval/x.py")
    # the arrow the other way is allowed: negatives are mined by searching
    assert back_arrows("retrieval.training", "from retrieval.serving.search import Run\n", "retrieval/training/x.py") == []
    assert back_arrows("flows", "from retrieval.training.finetune import FinetuneConfig\n", "flows/x.py") == []


def test_a_new_back_arrow_fails_the_check():
    # what a regression would look like: the foundation reaching up into a stage, a stage into the chain
    assert back_arrows("retroflow", "def f():\n    from eval.evaluate import evaluate\n", "retroflow/x.py") == [
        "retroflow/x.py imports eval.evaluate (retroflow may import only retroflow)"
    ]
    assert back_arrows("retrieval", "import flows.chain\n", "retrieval/x.py")
    assert back_arrows("retromae", "from retrieval.serving.encoder import Encoder\n", "retromae/x.py")  # siblings stay apart
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


def project_imports(source: str, module_level_only: bool) -> set[str]:
    """The project modules `source` imports (`from a import b` names `a.b` when that is a module);
    with `module_level_only`, not those inside functions (they run when called, not on import)."""
    found = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not (module_level_only and inside):
                if isinstance(child, ast.Import):
                    names = [alias.name for alias in child.names]
                else:
                    names = [child.module, *(f"{child.module}.{alias.name}" for alias in child.names)]
                found.update(n for n in names if n in PROJECT_MODULES)
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    return {name: project_imports(path.read_text(), module_level_only) for name, path in PROJECT_MODULES.items()}


def test_no_module_level_import_cycles():
    assert import_cycles(import_graph(module_level_only=True)) == []


def test_no_import_cycles_through_lazy_imports_either():
    """An import inside a function is harmless on import, but two modules that need each other
    are one idea split in two: give it one module (as the teacher-scores format got, issue 25)."""
    assert import_cycles(import_graph(module_level_only=False)) == []


def test_a_new_import_cycle_fails_the_check():
    graph = {"retrieval.a": {"retrieval.b"}, "retrieval.b": {"retrieval.c"}, "retrieval.c": {"retrieval.a"}, "retrieval.d": {"retrieval.a"}}
    assert import_cycles(graph) == [["retrieval.a", "retrieval.b", "retrieval.c"]]
    assert import_cycles({"retrieval.a": {"retrieval.b"}, "retrieval.b": set()}) == []
    lazy = "def f():\n    from retrieval.training.teacher import SCORES_FILE\n"
    assert project_imports(lazy, module_level_only=True) == set()
    assert project_imports(lazy, module_level_only=False) == {"retrieval.training.teacher"}
    assert project_imports("from retroflow import data\n", module_level_only=True) == {"retroflow", "retroflow.data"}


def is_cli(module: str) -> bool:
    return module.rsplit(".", 1)[-1].endswith("cli")


def test_only_command_line_modules_import_command_line_modules():
    graph = import_graph(module_level_only=False)
    offenders = [
        f"{name} imports {target}"
        for name, targets in sorted(graph.items())
        if not is_cli(name)
        for target in sorted(targets)
        if is_cli(target)
    ]
    assert offenders == []
