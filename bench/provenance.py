"""What a benchmark records about where it ran, without this machine's paths: committed results
name files relative to the repository, and anything outside it by its last few path parts."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shown_path(path: str | Path) -> str:
    """`configs/x.yaml` for a file of the repository; `…/a/b/c` for an absolute path outside it."""
    given = Path(path)
    if not given.is_absolute():
        return given.as_posix()
    resolved = given.resolve()
    if resolved.is_relative_to(REPO):
        return resolved.relative_to(REPO).as_posix()
    return "…/" + "/".join(resolved.parts[-3:])


def shown_command(script: str, argv: list[str]) -> str:
    """The command line as recorded: `python bench/<script> ...`, absolute paths shown as above."""
    return " ".join(["python", f"bench/{script}", *(shown_path(a) if a.startswith("/") else a for a in argv)])
