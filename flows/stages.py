"""Every stage, once: its config class, its `run` function, its inputs, and the code that enters its key.

A stage is a plain function with one contract,

    run(config, inputs, out_dir, partial_dir) -> metrics

where `inputs` maps names to upstream artifacts (or external models) and `out_dir` receives the
files. `build` wraps it in the content-addressed store; `artifact_key` is the one key function,
used by the stage commands, the plain chain (`retroflow pipeline`) and the Prefect tasks, so any
of them reuses what another built.

A stage's code (`Stage.code_version`) is the source of the files its `run` can execute: its
module and the project modules that module imports, transitively (`retroflow.code_closure`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from retroflow.artifacts import Artifact, ArtifactStore, stage_key
from retroflow.code_closure import closure_files, project_root
from retroflow.config import StageConfig
from retroflow.hashing import sources_version
from retroflow.inputs import Input

log = logging.getLogger("retroflow.stages")


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # holds `run` and the config class; imported on use (torch is slow to import)
    config_class: str
    inputs: tuple[str, ...]  # the input names `run` reads (some optional)
    location_fields: tuple[str, ...] = ()  # config fields that say where, not what: not part of the key
    run_function: str = "run"
    summary: str = ""

    def config_type(self) -> type[StageConfig]:
        return getattr(importlib.import_module(self.module), self.config_class)

    def code_files(self, root: Path | None = None) -> list[Path]:
        """The source files whose content enters the key: those `run` can execute (its module's
        import closure, entered at `run` and the config class; `retroflow.code_closure`)."""
        return closure_files(self.module, (self.run_function, self.config_class), root)

    def code_version(self, root: Path | None = None) -> str:
        """The hash of `code_files` (under `root`: another checkout of the project, for tests)."""
        root = Path(root or project_root()).resolve()
        return sources_version(root, self.code_files(root))

    def run(self, config: StageConfig, inputs: Mapping[str, Input], out_dir: Path, partial_dir: Path) -> dict[str, Any]:
        function: Callable[..., dict[str, Any]] = getattr(importlib.import_module(self.module), self.run_function)
        return function(config, inputs, out_dir, partial_dir)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("data", "retroflow.data", "DataConfig", (), ("source",), summary="a dataset normalised to Parquet (corpus, queries, qrels)"),
        Stage(
            "tokenizer",
            "retromae.pretrain",
            "PretrainConfig",
            ("data",),
            run_function="run_tokenizer_stage",
            summary="the WordPiece vocabulary of a from-scratch pretraining",
        ),
        Stage(
            "pretrain", "retromae.pretrain", "PretrainConfig", ("data", "tokenizer"), summary="RetroMAE (or MLM) pretraining of the encoder"
        ),
        Stage(
            "negatives",
            "retrieval.training.negatives",
            "NegativesConfig",
            ("data", "model"),
            summary="hard negatives for the training queries (BM25 or dense)",
        ),
        Stage(
            "teacher",
            "retrieval.training.teacher",
            "TeacherConfig",
            ("data", "init", "negatives", "embeddings"),
            summary="the distillation teacher's scores (BM25+dense fusion or a cross-encoder)",
        ),
        Stage(
            "finetune",
            "retrieval.training.finetune",
            "FinetuneConfig",
            ("data", "model", "negatives", "teacher", "init"),
            summary="DPR fine-tuning of the bi-encoder",
        ),
        Stage(
            "encode",
            "retrieval.serving.encode",
            "EncodeConfig",
            ("data", "model"),
            summary="the corpus's vectors, encoded shard by shard",
        ),
        Stage("index", "retrieval.serving.index", "IndexConfig", ("embeddings",), summary="a FAISS index over the vectors"),
        Stage(
            "tune",
            "retrieval.serving.tune",
            "TuneConfig",
            ("index", "embeddings", "data", "model"),
            summary="the index's search knobs, chosen against exact search (nDCG on dev queries, recall)",
        ),
        Stage(
            "evaluate",
            "eval.evaluate",
            "EvaluateConfig",
            ("data", "model", "index", "embeddings"),
            summary="a system's metrics (and per-query values) on a dataset split",
        ),
        # the ablation's own steps (flows/ablation.py)
        Stage("corpus", "flows.ablation", "CorpusConfig", ("corpus*",), summary="the ablation's pretraining text"),
        Stage(
            "scratch",
            "retromae.pretrain",
            "PretrainConfig",
            ("tokenizer",),
            run_function="run_scratch_stage",
            summary="the untrained from-scratch encoder (the ablation's `none` arm)",
        ),
    )
}


def key_config(stage: str, config: StageConfig) -> dict[str, Any]:
    """The config as the key sees it: without the fields that inputs fill in (paths differ by
    machine and store; the inputs enter the key by content instead), and with every `precision`
    as it resolves here ('auto' is bf16 on one CPU and fp32 on another: different numbers), and
    so is FAISS's `gpu` (k-means on a GPU trains other IVF centroids than on a CPU)."""
    kept = {k: v for k, v in config.canonical().items() if k not in STAGES[stage].location_fields}
    return with_resolved_faiss_gpu(with_resolved_precision(kept))


def with_resolved_faiss_gpu(node: dict[str, Any]) -> dict[str, Any]:
    """`node` with an index config's `gpu: auto` replaced by what it resolves to on this machine."""
    if node.get("gpu") != "auto" or "IVF" not in str(node.get("factory", "")).upper():
        return node  # only IVF training (k-means) runs on the GPU: other indexes are the same files
    from retrieval.serving.index import gpu_count

    return {**node, "gpu": "always" if gpu_count() else "never"}


def with_resolved_precision(node: Any) -> Any:
    """`node` with each section's `precision` replaced by what it resolves to on this machine
    (using the section's `device`, when it has one)."""
    if not isinstance(node, dict):
        return node
    out = {k: with_resolved_precision(v) for k, v in node.items()}
    if isinstance(out.get("precision"), str):
        from retroflow.devices import resolve_precision

        out["precision"] = resolve_precision(str(out.get("device") or "auto"), out["precision"])
    return out


def resolved_precisions(node: Any, prefix: str = "") -> dict[str, str]:
    """{dotted field: resolved precision} of every `precision` in a key config (for the manifest)."""
    if not isinstance(node, dict):
        return {}
    found = {f"{prefix}precision": node["precision"]} if isinstance(node.get("precision"), str) else {}
    for k, v in node.items():
        found.update(resolved_precisions(v, f"{prefix}{k}."))
    return found


def artifact_key(stage: str, config: StageConfig, inputs: Mapping[str, Input | None], code: str | None = None) -> str:
    """THE artifact key: stage, config, inputs by fingerprint, and the stage's code (its version,
    hashed from the source when not given)."""
    return stage_key(stage, key_config(stage, config), present(inputs), code or STAGES[stage].code_version())


def present(inputs: Mapping[str, Input | None]) -> dict[str, Input]:
    """The inputs given (a chain passes None for an optional input it does not have)."""
    return {name: value for name, value in inputs.items() if value is not None}


def build(store: ArtifactStore, stage: str, config: StageConfig, inputs: Mapping[str, Input], processes: int = 1) -> Artifact:
    """The stage's artifact for (config, inputs): found in the store, or made by its `run`
    (in `processes` torchrun processes when more than one)."""
    spec = STAGES[stage]
    inputs = present(inputs)
    unknown = {name for name in inputs if not any(fnmatch(name, pattern) for pattern in spec.inputs)}
    if unknown:
        raise ValueError(f"stage {stage!r} takes inputs {', '.join(spec.inputs)}; not {', '.join(sorted(unknown))}")

    precisions = resolved_precisions(key_config(stage, config))

    def body(out_dir: Path, partial_dir: Path) -> dict[str, Any]:
        if processes > 1:
            metrics = launch_torchrun(stage, config, inputs, processes, out_dir, partial_dir)
        else:
            metrics = spec.run(config, inputs, out_dir, partial_dir)
        # the manifest says what 'auto' meant on the machine that built it (the key holds it too)
        return {**(metrics or {}), **({"precision": precisions} if precisions else {})}

    code = spec.code_version()  # read the source once: the key and the manifest both record it
    return store.build(stage, config, inputs, code, body, key=artifact_key(stage, config, inputs, code))


# ---------------------------------------------------------------------------------------
# Several processes per stage: torchrun runs `retroflow stage-run` in each
# ---------------------------------------------------------------------------------------

RUN_DIR = "run"


def launch_torchrun(
    stage: str, config: StageConfig, inputs: Mapping[str, Input], processes: int, out_dir: Path, partial_dir: Path
) -> dict[str, Any]:
    """Run the stage under torchrun (one process per GPU; gloo on CPU).

    The processes train into `partial_dir/run` (checkpoints included, so a re-run resumes); its
    outputs, not its checkpoints, are moved into `out_dir`. Metrics come from the JSON line."""
    import subprocess
    import sys

    import yaml

    run_dir = partial_dir / RUN_DIR
    config_file, inputs_file = partial_dir / f"{stage}.yaml", partial_dir / f"{stage}-inputs.json"
    config_file.write_text(yaml.safe_dump(config.canonical(), sort_keys=True))
    inputs_file.write_text(json.dumps({name: value.ref() for name, value in inputs.items()}))
    cli = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *single_node_rendezvous(),
        f"--nproc_per_node={processes}",
        "-m",
        "flows.cli",
        "stage-run",
        stage,
        "--config",
        str(config_file),
        "--inputs",
        str(inputs_file),
        "--output",
        str(run_dir),
    ]
    log.info("launching %s", " ".join(cli))
    finished = subprocess.run(cli, stdout=subprocess.PIPE, text=True, check=False, env=loopback_environment())
    if finished.returncode != 0:
        raise RuntimeError(f"torchrun {stage} failed with exit code {finished.returncode}")
    metrics = json.loads(finished.stdout.strip().splitlines()[-1])
    for item in run_dir.iterdir():
        if item.name != "partial":
            shutil.move(str(item), out_dir / item.name)
    return metrics


def run_in_process_group(stage: str, config_file: Path, inputs_file: Path, run_dir: Path) -> dict[str, Any]:
    """One torchrun process's share of a stage (the `stage-run` command): `run` into `run_dir`,
    its resumable state in `run_dir/partial`."""
    from retroflow.config import load_config
    from retroflow.inputs import open_input

    spec = STAGES[stage]
    config = load_config(spec.config_type(), config_file)
    inputs = {name: open_input(ref) for name, ref in json.loads(Path(inputs_file).read_text()).items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    return spec.run(config, inputs, run_dir, run_dir / "partial")


def single_node_rendezvous() -> list[str]:
    """torchrun's standalone rendezvous, addressed at the loopback interface and a free port.
    (torch's TCPStore still listens on every interface: it has no bind-address option; the port is
    random and open only while the run lasts. docs/reliability.md says so.)"""
    import uuid

    return ["--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4().hex}"]


def loopback_environment() -> dict[str, str]:
    """The training processes' collective back-ends (gloo, NCCL) talk over loopback: one machine
    needs no other interface, and nothing outside it should reach their sockets."""
    env = dict(os.environ)
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    return env
