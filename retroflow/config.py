"""Typed stage configs loaded from YAML, with errors that name the file and field.

Every stage config subclasses `StageConfig`: unknown keys, wrong types and impossible
values are rejected at load time, not half-way through a training run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from retroflow.hashing import hash_json

C = TypeVar("C", bound="StageConfig")


class ConfigError(ValueError):
    """A config file or override could not be turned into a valid stage config."""


# Letters, digits, '.', '_', '-', not starting with '.': one directory name on every OS, and
# never '..', an absolute path or a hidden (staging-looking) entry.
PATH_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_path_component(value: str) -> str:
    """For a pydantic validator: `value` when it can be used as one directory name (a run's or an
    ablation's folder in the store, which is replaced when a run finishes)."""
    if not PATH_COMPONENT.fullmatch(value):
        raise ValueError(
            "must be one plain path component (letters, digits, '.', '_', '-'; not starting with '.'; at most 128 characters): "
            "it names a folder in the store that each run replaces"
        )
    return value


def listed_part(directory: Path, name: Any, listing: Path) -> Path:
    """`directory / name` for a part a metadata file lists (`listing`: embeddings.json's shards,
    index.json's files), refused unless `name` is one plain path component: such a file may come
    from elsewhere, and a `../` entry would make a reader open files outside the directory."""
    if not isinstance(name, str) or not PATH_COMPONENT.fullmatch(name):
        raise ValueError(f"{listing}: lists {name!r}, which is not a file or folder name inside {directory}; refusing it")
    return directory / name


def child_dir(parent: Path, name: str, what: str) -> Path:
    """`parent / name`, refused unless it resolves to a direct child of `parent` (a name that is a
    path, or a symlinked folder, would make a run replace a directory outside the store)."""
    base = parent.resolve()
    path = base / name
    if not PATH_COMPONENT.fullmatch(name) or path.resolve().parent != base:
        raise ConfigError(f"{what} {name!r}: {parent / name} does not resolve to a folder directly inside {base}; refusing to write there")
    return path


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    # fields older configs carried that are now inputs of the stage's `run`: field -> how to give it
    moved_to_inputs: ClassVar[dict[str, str]] = {}

    def canonical(self) -> dict[str, Any]:
        """JSON-ready dict used for hashing and manifests (stable key order)."""
        return json.loads(self.model_dump_json())

    def fingerprint(self) -> str:
        return hash_json(self.canonical())

    def with_overrides(self: C, **changes: Any) -> C:
        merged = _deep_merge(self.canonical(), {k: v for k, v in changes.items() if v is not None})
        return validate_config(type(self), merged, source="<overrides>")


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    """One line (a shell shows it whole): the source, then each bad field with what was given."""
    problems = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "<root>"
        given = problem.get("input")
        shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
        problems.append(f"field '{field}': {problem['msg']}{shown}")
    return f"invalid config {source}: " + "; ".join(problems)


def validate_config(cls: type[C], data: Mapping[str, Any], source: str = "<dict>") -> C:
    moved = [f"field '{k}' is an input now: {cls.moved_to_inputs[k]}" for k in data if k in getattr(cls, "moved_to_inputs", {})]
    if moved:
        raise ConfigError(f"invalid config {source}: " + "; ".join(moved))
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def flag(key: str, value: Any) -> tuple[list[str], Any]:
    """An override from a command's own flag: its value is used as given, never parsed as YAML, so
    `--dataset 0123` stays the string '0123' (YAML would read an octal 83), as do `null` and `yes`."""
    return key.split("."), value


def required_flag(args: Any, name: str, command: str | None = None) -> str:
    """The value of the command's flag --NAME, which gives an input of its stage (a dataset, a model):
    without it, a one-line error naming the flag."""
    value = getattr(args, name, None)
    if not value:
        command = command or getattr(args, "stage", "")
        raise ConfigError(f"retroflow {command}: pass --{name.replace('_', '-')} (an input of the stage, not a config field)")
    return value


def parse_override(text: str | tuple[list[str], Any]) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a','b'], 3); the value is parsed as YAML so numbers and bools work.
    A (path, value) pair from `flag` passes through."""
    if isinstance(text, tuple):
        return text
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}); quote it to pass a string") from None
    return dotted.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list | None) -> dict[str, Any]:
    out = dict(data)
    for text in overrides or []:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list | None = None) -> C:
    """Load `cls` from a YAML file (or defaults when `path` is None) plus `key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return validate_config(cls, data, source=str(path) if path else "<defaults>")
