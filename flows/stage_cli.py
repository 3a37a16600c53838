"""The stage commands without `--output`: the stage runs into the artifact store through
`flows.stages.build`, the same function and key the chain and the flow use, so a stage run from
the command line is an artifact `retroflow pipeline` and the Prefect flow reuse (and the other
way round). Inputs are named as on the command line: a dataset name or directory, a model alias or
directory, or a file or directory inside an artifact of the store."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from flows.chain import prepare_data
from flows.stages import STAGES, build
from retroflow.artifacts import Artifact, ArtifactStore, default_store
from retroflow.config import ConfigError, StageConfig, required_flag
from retroflow.console import emit_json
from retroflow.inputs import Input, artifact_containing, model_input


def runs_in_store(args: argparse.Namespace) -> bool:
    """No --output. `index` and `tune` keep their plain-directory defaults unless their input is a
    store artifact (and `tune` sweeps with the corpus vectors as queries, as the stage does)."""
    if getattr(args, "stage", None) not in STAGES or getattr(args, "output", None) is not None:
        return False
    if args.stage == "index":
        return in_artifact(args.embeddings, "encode")
    if args.stage == "tune":
        return in_artifact(args.index, "index", "tune") and not (args.queries or args.dataset)
    return True


def in_artifact(path: Path | None, *stages: str) -> bool:
    artifact = artifact_containing(path) if path is not None else None
    return artifact is not None and artifact.stage in stages


def run_in_store(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "the artifact store is written by one process: under torchrun pass --output DIR "
            "(or let a pipeline with train_processes > 1 launch torchrun itself)"
        )
    store = default_store()
    config = args.config_from_args(args)
    inputs = STAGE_INPUTS[args.stage](args, config, store)
    artifact = build(store, args.stage, config, inputs)
    print(f"{args.stage} artifact: {artifact.path}")
    emit_json({"artifact": str(artifact.path), "key": artifact.key, **short(artifact.metrics)})
    return 0


def short(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.endswith("_history")}


def artifact_input(path: Path | None, flag: str, stage: str) -> Artifact | None:
    if path is None:
        return None
    artifact = artifact_containing(path)
    if artifact is None or artifact.stage != stage:
        raise ConfigError(f"{flag} {path}: not inside a `{stage}` artifact of a store; a loose file needs --output DIR (no store)")
    return artifact


def pretrain_inputs(args: argparse.Namespace, config: StageConfig, store: ArtifactStore) -> dict[str, Input | None]:
    from retromae.pretrain import needs_tokenizer, tokenizer_config

    source = getattr(args, "dataset", None) or dataset_of_corpus(config.data.beir_corpus)
    data = prepare_data(store, source)
    tokenizer = build(store, "tokenizer", tokenizer_config(config), {"data": data}) if needs_tokenizer(config) else None
    return {"data": data, "tokenizer": tokenizer}


def dataset_of_corpus(corpus: str | None) -> str:
    if not corpus or Path(corpus).name != "corpus.jsonl":
        raise ConfigError("pretraining into the store reads a dataset: pass --dataset NAME (or --output DIR to train on data.files)")
    return str(Path(corpus).expanduser().parent)


def tune_inputs(args: argparse.Namespace, config: StageConfig, store: ArtifactStore) -> dict[str, Input | None]:
    index = artifact_containing(args.index)
    recorded = index.manifest["inputs"].get("embeddings", {}).get("path")
    embeddings = artifact_input(args.embeddings or (Path(recorded) if recorded else None), "--embeddings", "encode")
    if embeddings is None:
        raise ConfigError(f"{args.index}: the index records no embeddings artifact; pass --embeddings")
    return {"index": index, "embeddings": embeddings}


STAGE_INPUTS = {
    "pretrain": pretrain_inputs,
    "negatives": lambda args, config, store: {
        "data": prepare_data(store, required_flag(args, "dataset", "negatives")),
        "model": model_input(required_flag(args, "model", "negatives")) if config.method == "dense" else None,
    },
    "teacher": lambda args, config, store: {
        "data": prepare_data(store, required_flag(args, "dataset", "teacher")),
        "init": model_input(required_flag(args, "model", "teacher")),
        "negatives": artifact_input(args.negatives, "--negatives", "negatives") if config.kind == "cross_encoder" else None,
    },
    "finetune": lambda args, config, store: {
        "data": prepare_data(store, required_flag(args, "dataset", "finetune")),
        "model": model_input(required_flag(args, "model", "finetune")),
        "negatives": artifact_input(args.negatives, "--negatives", "negatives"),
        "teacher": artifact_input(args.teacher_scores, "--teacher-scores", "teacher"),
    },
    "encode": lambda args, config, store: {
        "data": prepare_data(store, required_flag(args, "dataset", "encode")),
        "model": model_input(required_flag(args, "model", "encode")),
    },
    "index": lambda args, config, store: {"embeddings": artifact_input(args.embeddings, "--embeddings", "encode")},
    "tune": tune_inputs,
}
