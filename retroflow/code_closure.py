"""Which source files a stage's code is: the files its `run` can execute, found by reading imports.

A stage's code version (a part of its artifact key) hashes exactly these files, so an edit to a
module the stage runs changes the key and an edit anywhere else does not. The files are:

- the stage's module;
- every project module (`retroflow`, `retromae`, `retrieval`, `eval`, `flows`) reachable from it
  through `import` / `from ... import` statements, at module level or inside functions,
  transitively, and the `__init__.py` of every package on the way (importing `a.b.c` runs `a`
  and `a.b` first);
- in the stage's own module, an import inside a function counts only when that function (or
  class) is reachable by name from the stage's entry points (its `run` function and its config
  class) or from the module's top-level statements: `flows/ablation.py` hosts the `corpus` stage
  beside the ablation's orchestration, whose lazy imports of every training stage the corpus run
  never executes. Every other module counts all its imports (a conservative over-estimate).

The walk does not enter command-line modules (`*cli.py`: they call stages, stages do not call
them; `tests/test_layers.py` checks that no other module imports one) nor the `flows/`
orchestration modules other than the stage's own (the chain, the stage table, the Prefect tasks:
they call `run`; `run` does not call them).

What is not seen: imports by computed name (`importlib.import_module(name)`, used only by the
CLI dispatchers and the stage table) and code outside the project (torch, transformers, ...:
their versions are the environment's, not the key's).

The closure is parsed once per process (and source root); hashing its files is cheap.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PROJECT_PACKAGES = ("retroflow", "retromae", "retrieval", "eval", "flows")
ORCHESTRATION_PACKAGE = "flows"


def project_root() -> Path:
    """The directory holding the project's packages (this checkout)."""
    return Path(__file__).resolve().parents[1]


def is_cli(module: str) -> bool:
    """A command-line module (`flows/cli.py`, `retrieval/serving/index_cli.py`, ...)."""
    return module.rsplit(".", 1)[-1].endswith("cli")


def is_orchestration(module: str) -> bool:
    return module.split(".")[0] == ORCHESTRATION_PACKAGE


@functools.cache
def project_modules(root: Path) -> dict[str, Path]:
    """{dotted module name: source file} of every module of the project's packages under `root`."""
    found = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def parents(module: str) -> list[str]:
    """The packages importing `module` runs first: `a.b.c` -> [`a`, `a.b`]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@dataclass(frozen=True)
class Statement:
    """A top-level statement of a module, as the reachability walk sees it."""

    binds: frozenset[str]  # the names it defines (a function, a class, assignment targets, import aliases)
    references: frozenset[str]  # every name it mentions
    imports: frozenset[str]  # project modules named by import statements anywhere inside it
    is_definition: bool  # a function or class: runs only when reached (its body; imports inside it)


@dataclass(frozen=True)
class ModuleImports:
    module_level: frozenset[str]  # imports outside any function: run when the module is imported
    statements: tuple[Statement, ...]

    @property
    def all(self) -> frozenset[str]:
        return frozenset().union(self.module_level, *(s.imports for s in self.statements))


def resolve_import(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The project modules an import statement of `module` names (modules, not attributes)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        targets = [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
    return {name for name in targets if name in known}


class _Collector(ast.NodeVisitor):
    """Names mentioned and project imports made inside one top-level statement."""

    def __init__(self, module: str, is_package: bool, known: dict[str, Path]):
        self.module, self.is_package, self.known = module, is_package, known
        self.names: set[str] = set()
        self.imports: set[str] = set()
        self.module_level: set[str] = set()
        self.depth = 0  # functions entered

    def visit_Name(self, node: ast.Name) -> None:
        self.names.add(node.id)

    def _import(self, node: ast.Import | ast.ImportFrom) -> None:
        found = resolve_import(node, self.module, self.is_package, self.known)
        self.imports |= found
        if self.depth == 0:
            self.module_level |= found

    visit_Import = visit_ImportFrom = _import

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function


def bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


@functools.cache
def module_imports(root: Path, module: str) -> ModuleImports:
    known = project_modules(root)
    path = known[module]
    is_package = path.name == "__init__.py"
    statements, module_level = [], set()
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        collector = _Collector(module, is_package, known)
        is_definition = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if is_definition:
            # a function's body runs only when called: its imports are not module-level; a class
            # body runs on import, its methods when called
            collector.depth = int(not isinstance(node, ast.ClassDef))
        collector.visit(node)
        module_level |= collector.module_level
        statements.append(Statement(frozenset(bound_names(node)), frozenset(collector.names), frozenset(collector.imports), is_definition))
    return ModuleImports(frozenset(module_level), tuple(statements))


def reachable_imports(imports: ModuleImports, entries: tuple[str, ...]) -> set[str]:
    """The imports of a module that running `entries` (names defined in it) can execute: its
    module-level imports and those inside every definition reachable by name from the entries
    or from the module's top-level code."""
    wanted = set(entries)
    reached: set[int] = set()
    for i, statement in enumerate(imports.statements):
        if not statement.is_definition:
            reached.add(i)
            wanted |= statement.references
    changed = True
    while changed:
        changed = False
        for i, statement in enumerate(imports.statements):
            if i not in reached and statement.binds & wanted:
                reached.add(i)
                wanted |= statement.references
                changed = True
    return set(imports.module_level).union(*(imports.statements[i].imports for i in reached))


@functools.cache
def import_closure(module: str, entries: tuple[str, ...] = (), root: Path | None = None) -> tuple[str, ...]:
    """The project modules whose source a stage in `module`, entered at `entries`, can execute
    (sorted; `module` included). Without `entries`, all of `module`'s imports count; so they do
    when another module of the closure imports `module` (it may call anything in it)."""
    root = Path(root or project_root()).resolve()
    if module not in project_modules(root):
        raise ValueError(f"{module} is not a module of the project under {root}")
    whole: dict[str, bool] = {}  # module -> all its imports followed (else: only the entries')
    queue = [(module, not entries)]
    while queue:
        name, everything = queue.pop()
        if name in whole and (whole[name] or not everything):
            continue
        whole[name] = everything
        imports = module_imports(root, name)
        found = imports.all if everything else reachable_imports(imports, entries)
        for target in found:
            if target != module and (is_cli(target) or is_orchestration(target)):
                continue  # they call stages; a stage does not call them
            queue.append((target, True))
            queue.extend((parent, parent != module) for parent in parents(target))
        # a package's own module-level code runs first; the stage module's only as far as it is imported
        queue.extend((parent, parent != module) for parent in parents(name))
    return tuple(sorted(whole))


def closure_files(module: str, entries: tuple[str, ...] = (), root: Path | None = None) -> list[Path]:
    """The source files of `import_closure(module, entries, root)`, in the closure's order."""
    root = Path(root or project_root()).resolve()
    known = project_modules(root)
    return [known[name] for name in import_closure(module, entries, root)]
