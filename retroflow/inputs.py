"""What a stage reads: upstream artifacts, or things the pipeline did not make (a packaged or hub
model), both fingerprinted by content so that they enter artifact keys the same way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retroflow.artifacts import MANIFEST, Artifact, artifact_label, open_verified
from retroflow.hashing import directory_fingerprint, sha256_file


@dataclass(frozen=True)
class ExternalInput:
    """Something the pipeline did not make (a packaged model, a hub model): fingerprinted by content."""

    name: str
    path: Path
    fingerprint: str

    def ref(self) -> dict[str, str]:
        return {"stage": "external", "name": self.name, "fingerprint": self.fingerprint, "path": str(self.path)}

    def file(self, name: str) -> Path:
        """`name` inside the input, or the input itself when it is one loose file (`--negatives FILE`)."""
        return self.path if self.path.is_file() else self.path / name


Input = Artifact | ExternalInput
ModelRef = Input


def external_model(name: str) -> ExternalInput:
    from retroflow.models import resolve_model_path

    path = resolve_model_path(name)
    return ExternalInput(name=name, path=path, fingerprint=directory_fingerprint(path))


def model_input(name: str | Path) -> Input:
    """A model directory the store made (its artifact), else an alias, directory or hub id."""
    return artifact_containing(name) or external_model(str(name))


def path_input(path: str | Path) -> ExternalInput:
    """A loose file or directory outside the store (`--negatives FILE`, `--embeddings DIR`), by content."""
    path = Path(path).expanduser()
    if path.is_file():
        return ExternalInput(name=str(path), path=path, fingerprint=sha256_file(path))
    if path.is_dir():
        return ExternalInput(name=str(path), path=path, fingerprint=directory_fingerprint(path))
    raise FileNotFoundError(f"{path}: no such file or directory")


def inputs_of(**named: Input | None) -> dict[str, Input]:
    """The inputs mapping a stage's `run` takes, without the ones not given."""
    return {name: value for name, value in named.items() if value is not None}


def model_dir(ref: Input) -> Path:
    """The HF model directory inside a model-producing artifact (or the external model itself)."""
    if isinstance(ref, ExternalInput):
        return ref.path
    for candidate in ("model", "encoder"):
        if (ref.path / candidate / "config.json").is_file():
            return ref.path / candidate
    raise FileNotFoundError(f"artifact {ref.path} holds no model directory (model/ or encoder/)")


def model_label(model: Input) -> str:
    return model.name if isinstance(model, ExternalInput) else f"{model.stage}/{model.key}"


def model_folder_label(model: Input) -> str:
    """How files a stage writes name a model it read (vectors' metadata, a model card's base
    model): as given (an alias, a directory, a hub id), or a store model by its folder's place in
    the store (`stage/key/model`), the same on every store root. A folder given by a relative path
    is named by its absolute one: the name is read back from another working directory (a
    Prefect worker, a later CLI run), where the relative one names nothing or another folder."""
    if not isinstance(model, ExternalInput):
        return artifact_label(model_dir(model))
    given = Path(model.name).expanduser()
    return str(given.resolve()) if given.is_dir() and not Path(model.name).is_absolute() else model.name


def artifact_containing(path: str | Path) -> Artifact | None:
    """The finished artifact a path lies in (the directory itself or a file inside it), if any. A
    path that does not exist lies in none (an alias such as `minilm` is not a file of the cwd)."""
    path = Path(path).expanduser()
    if not path.exists():
        return None
    path = path.resolve()
    for candidate in (path, *path.parents):
        if (candidate / MANIFEST).is_file():
            return open_verified(candidate)
    return None


def open_input(ref: Mapping[str, Any]) -> Input:
    """An input back from its `ref()` (how a torchrun child learns what its parent was given)."""
    if ref["stage"] == "external":
        return ExternalInput(name=ref["name"], path=Path(ref["path"]), fingerprint=ref["fingerprint"])
    return Artifact.open(ref["path"])
