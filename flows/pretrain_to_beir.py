"""Flow `pretrain-to-beir`: the pipeline of `retroflow.pipeline` as cached Prefect tasks,
plus the run's artifacts (metrics table, markdown report with lineage, loss plot)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from eval.report import loss_history, metric_rows, plot_loss_curves, run_report_markdown
from flows.runners import task_runner_from_env
from flows.tasks import artifact_key, make_task
from retroflow.artifacts import ArtifactStore, atomic_write_text
from retroflow.pipeline import (
    PipelineConfig,
    PipelineResult,
    export_model,
    load_pipeline_config,
    previous_records,
    read_evaluation,
    record_evaluations,
    regressions,
    run_pipeline,
    store_for,
)

DEFAULT_CONFIG = "configs/pipeline/quickstart.yaml"


def task_executor(pipeline: PipelineConfig):
    """(execute, execute_map): run steps as cached tasks; mapped steps go to the task runner."""
    return store_executor(store_for(pipeline))


def store_executor(store: ArtifactStore):
    """(execute, execute_map) over one artifact store: each step a cached task keyed like the store."""
    tasks: dict[str, Any] = {}

    def task_for(step: str, fn):
        if step not in tasks:
            tasks[step] = make_task(step, fn, store)
        return tasks[step]

    def execute(step: str, fn, *args):
        return task_for(step, fn)(*args)

    def execute_map(step: str, fn, calls: list[tuple]) -> list:
        if not calls:
            return []
        futures = task_for(step, fn).map(*[list(column) for column in zip(*calls)])
        return [future.result() for future in futures]

    return execute, execute_map


@flow(name="pretrain-to-beir", task_runner=task_runner_from_env())
def pretrain_to_beir(config: str = DEFAULT_CONFIG, overrides: list[str] | None = None) -> dict[str, Any]:
    """Prepare data -> RetroMAE pretraining -> negatives -> teacher -> fine-tuning -> sharded
    encoding -> index (+ autotune) -> evaluation on each dataset -> report."""
    pipeline = load_pipeline_config(config, overrides)
    result = run_pipeline(pipeline, *task_executor(pipeline))
    return publish_report(pipeline, result)


def embedded_png(title: str, path) -> str:
    """Markdown showing a PNG inline (the Prefect UI renders data URIs) plus where the file is."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{encoded})\n\nFile: `{path}`"


def publish_report(pipeline: PipelineConfig, result: PipelineResult) -> dict[str, Any]:
    logger = get_run_logger()
    evaluations = {name: read_evaluation(art) for name, art in result.evaluations.items()}
    record_evaluations(pipeline, result.evaluations, evaluations)
    previous = previous_records(pipeline, result.evaluations, evaluations)
    references = {source: {name: read_evaluation(art) for name, art in refs.items()} for source, refs in result.references.items()}
    rows = metric_rows(evaluations, {k: rec.metrics for k, rec in previous.items() if rec is not None}, references=references)
    flagged = regressions(pipeline, evaluations, previous)
    create_table_artifact(
        key=artifact_key("metrics", pipeline.name),
        table=rows,
        description=f"pretrain-to-beir/{pipeline.name}: the model, its init, BM25 and the hybrids per dataset; deltas against the init and the previous run",
    )
    curves = {stage: loss_history(art) for stage, art in result.artifacts.items() if stage in ("pretrain", "finetune", "teacher")}
    run_dir = store_for(pipeline).root / "runs" / pipeline.name
    plot = plot_loss_curves(curves, run_dir / "loss.png")
    extra = {}
    if plot:
        extra["Training loss"] = embedded_png("training loss", plot)
    gate = result.artifacts["finetune"].metrics.get("distill_gate") if "finetune" in result.artifacts else None
    if gate:
        extra["Distillation gate"] = ("Distilled from the teacher: " if gate["distilled"] else "**Not distilled**: ") + gate["reason"]
    for name, art in result.artifacts.items():
        if name.startswith("tune:") and art.file("tune.png").is_file():
            extra[f"Recall vs QPS ({name.removeprefix('tune:')})"] = embedded_png("recall@10 vs queries/s", art.file("tune.png"))
    markdown = run_report_markdown(
        pipeline.name,
        pipeline.canonical(),
        rows,
        [*result.evaluations.values(), *(a for refs in result.references.values() for a in refs.values())],
        flagged,
        extra,
    )
    create_markdown_artifact(key=artifact_key("report", pipeline.name), markdown=markdown, description="run report: metrics, lineage, config")
    summary = {"pipeline": pipeline.name, "rows": rows, "regressions": flagged, "report": str(run_dir / "report.md"),
               "shard_workers": sorted({r.get("worker_pid") for r in result.shard_results if isinstance(r, dict)})}  # fmt: skip
    exported = export_model(pipeline, result, rows)
    summary["model_dir"] = str(exported) if exported else None
    atomic_write_text(run_dir / "report.md", markdown)
    atomic_write_text(run_dir / "latest.json", json.dumps(summary, indent=2, default=str))
    for line in flagged:
        logger.warning("regression: %s", line)
    logger.info("metrics: %s", json.dumps(rows))
    return summary


if __name__ == "__main__":
    pretrain_to_beir(os.environ.get("RETROFLOW_PIPELINE_CONFIG", DEFAULT_CONFIG))
