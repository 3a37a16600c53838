"""A stage's code version follows the code its `run` executes (issue 25 item 1).

Edits are made to a copy of the project's packages; each stage's key is computed with the code
version of that copy (`Stage.code_version(root)`), so the real checkout is never touched.
"""

from __future__ import annotations

import modulefinder
import shutil
import types
from pathlib import Path

import pytest

from flows.stages import STAGES, Stage, artifact_key
from retroflow.code_closure import PROJECT_PACKAGES, project_modules

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the project's packages (sources only)."""
    for package in PROJECT_PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def default_config(name: str):
    if name == "data":
        return STAGES[name].config_type()(source="scifact", content_fingerprint="f")
    return STAGES[name].config_type()()


def keys(root: Path) -> dict[str, str]:
    return {name: artifact_key(name, default_config(name), {}, code=stage.code_version(root)) for name, stage in STAGES.items()}


def touch(root: Path, relative: str, text: str = "\n# an edit\n") -> None:
    with open(root / relative, "a", encoding="utf-8") as handle:
        handle.write(text)


# (file edited, stages whose key must change, stages whose key must not)
EDITS = [
    ("retrieval/serving/tune.py", {"tune"}, {"negatives", "teacher", "finetune", "encode", "index", "evaluate"}),
    ("retroflow/models.py", {"encode", "finetune", "pretrain", "negatives", "evaluate"}, {"data"}),
    ("retroflow/devices.py", {"finetune", "pretrain", "encode", "teacher"}, {"data", "corpus"}),
    ("retroflow/data/beir.py", {"data", "encode", "negatives", "finetune", "evaluate"}, {"pretrain", "corpus"}),
    ("retrieval/serving/index_cli.py", set(), set(STAGES)),
    ("flows/chain.py", set(), set(STAGES)),
    ("retrieval/serving/hybrid.py", {"teacher", "evaluate"}, {"negatives", "finetune", "encode", "index", "pretrain"}),
    ("retrieval/training/teacher_scores.py", {"teacher", "finetune"}, {"negatives", "encode", "index", "tune", "evaluate"}),
    ("retromae/data.py", {"corpus", "tokenizer", "pretrain", "scratch"}, {"finetune", "encode", "evaluate"}),
    ("flows/ablation.py", {"corpus"}, set(STAGES) - {"corpus"}),
]


@pytest.mark.parametrize(("edited", "changed", "unchanged"), EDITS, ids=[e[0] for e in EDITS])
def test_an_edit_changes_the_keys_of_the_stages_that_run_the_file_and_no_others(checkout, edited, changed, unchanged):
    before = keys(checkout)
    assert before == keys(REPO)  # the copy is the same code: the same keys
    touch(checkout, edited)
    after = keys(checkout)
    assert {name for name in STAGES if after[name] != before[name]} >= changed
    assert {name for name in unchanged if after[name] != before[name]} == set()


def test_the_issue_cases(checkout):
    """Issue 25: touching retrieval/serving/tune.py leaves the finetune key unchanged; touching
    retroflow/models.py changes the encode key; retroflow/devices.py changes finetune and pretrain."""
    before = keys(checkout)
    touch(checkout, "retrieval/serving/tune.py")
    assert keys(checkout)["finetune"] == before["finetune"]
    touch(checkout, "retroflow/models.py")
    assert keys(checkout)["encode"] != before["encode"]
    middle = keys(checkout)
    touch(checkout, "retroflow/devices.py")
    after = keys(checkout)
    assert after["finetune"] != middle["finetune"] and after["pretrain"] != middle["pretrain"]


# ---------------------------------------------------------------------------------------
# The closure, computed independently: modulefinder over the compiled bytecode
# ---------------------------------------------------------------------------------------


class ProjectFinder(modulefinder.ModuleFinder):
    """modulefinder over this checkout's packages only: everything else (the standard library,
    torch) is not found, hence not followed. CLI modules and the `flows/` modules other than
    `keep` are excluded: they call stages, stages do not call them."""

    def __init__(self, keep: str):
        names = project_modules(REPO.resolve())
        excluded = [n for n in names if n != keep and (n.rsplit(".", 1)[-1].endswith("cli") or (n.startswith("flows.")))]
        super().__init__(path=[str(REPO)], excludes=excluded)


def code_objects(co: types.CodeType) -> list[types.CodeType]:
    return [c for c in co.co_consts if isinstance(c, types.CodeType)]


def names_used(co: types.CodeType) -> set[str]:
    return set(co.co_names).union(*(names_used(c) for c in code_objects(co)))


def independent_closure(stage: Stage) -> set[str]:
    """The project modules a stage's `run` can import: its module's top-level imports, the imports
    in the functions and classes its `run` (or config class) reaches by name, and then everything
    every module imported that way imports, as modulefinder sees it."""
    finder = ProjectFinder(stage.module)
    path = project_modules(REPO.resolve())[stage.module]
    module = finder.add_module(stage.module)
    module.__file__ = str(path)
    if path.name == "__init__.py":
        module.__path__ = [str(path.parent)]
    if "." in stage.module:
        finder.import_hook(stage.module.rsplit(".", 1)[0])  # the parent packages run first

    def scan_top_level(co: types.CodeType) -> None:
        for what, args in finder.scan_opcodes(co):
            if what == "absolute_import":
                fromlist, name = args
                finder._safe_import_hook(name, module, fromlist, level=0)
            elif what == "relative_import":
                level, fromlist, name = args
                finder._safe_import_hook(name or "", module, fromlist, level=level)

    top = compile(path.read_text(encoding="utf-8"), str(path), "exec")
    scan_top_level(top)
    definitions = {c.co_name: c for c in code_objects(top) if not c.co_name.startswith("<")}
    for c in code_objects(top):
        if c.co_name.startswith("<"):  # a comprehension or lambda run by the top-level code
            finder.scan_code(c, module)
    wanted, reached = {stage.run_function, stage.config_class}, set()
    while wanted - reached:
        name = (wanted - reached).pop()
        reached.add(name)
        if name in definitions:
            finder.scan_code(definitions[name], module)
            wanted |= names_used(definitions[name])
    return {name for name in finder.modules if name.split(".")[0] in PROJECT_PACKAGES}


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_code_version_covers_the_imports_of_its_run(name):
    stage = STAGES[name]
    files = {p.relative_to(REPO.resolve()).as_posix() for p in stage.code_files(REPO.resolve())}
    known = project_modules(REPO.resolve())
    expected = {known[m].relative_to(REPO.resolve()).as_posix() for m in independent_closure(stage)}
    assert known[stage.module].relative_to(REPO.resolve()).as_posix() in files
    assert expected <= files, f"{name}: its code version misses {sorted(expected - files)}"
    assert not [f for f in files if f.endswith("cli.py")]  # commands call stages, not the other way round
    assert not [
        f
        for f in files
        if f.startswith("flows/") and f not in ("flows/__init__.py", known[stage.module].relative_to(REPO.resolve()).as_posix())
    ]


def test_the_corpus_stage_is_its_run_not_the_ablation_around_it():
    files = {p.relative_to(REPO.resolve()).as_posix() for p in STAGES["corpus"].code_files()}
    assert {"flows/ablation.py", "retromae/data.py"} <= files
    assert not [
        f for f in files if f.startswith(("retrieval/", "eval/")) or f in ("flows/chain.py", "flows/stages.py", "retromae/pretrain.py")
    ]


def test_the_closure_is_read_once_per_process(monkeypatch):
    import retroflow.code_closure as code_closure

    first = {name: stage.code_version() for name, stage in STAGES.items()}

    def no_parsing(*args, **kwargs):
        raise AssertionError("the closure was parsed again")

    monkeypatch.setattr(code_closure.ast, "parse", no_parsing)
    assert {name: stage.code_version() for name, stage in STAGES.items()} == first
