"""Flow `pretrain-to-beir`: the pipeline of `flows.chain` as cached Prefect tasks,
plus the run's artifacts (metrics table, markdown report with lineage, loss plot)."""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.chain import PipelineConfig, PipelineResult, load_pipeline_config, run_pipeline, store_for
from flows.run_report import write_run_report
from flows.runners import task_runner_from_env
from flows.tasks import make_task, ui_key
from retroflow.artifacts import ArtifactStore

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
def pretrain_to_beir(config: str = DEFAULT_CONFIG, overrides: list[str] | None = None, verify: bool = False) -> dict[str, Any]:
    """Prepare data -> RetroMAE pretraining -> negatives -> teacher -> fine-tuning -> sharded
    encoding -> index (+ autotune) -> evaluation on each dataset -> report. `verify`: re-hash every
    file of each stored artifact reused (as the config's `verify: true`)."""
    pipeline = load_pipeline_config(config, [*(overrides or []), *(["verify=true"] if verify else [])])
    result = run_pipeline(pipeline, *task_executor(pipeline))
    return publish_report(pipeline, result)


def publish_report(pipeline: PipelineConfig, result: PipelineResult) -> dict[str, Any]:
    """The run's report files (as `retroflow pipeline` writes them), published as Prefect artifacts."""
    logger = get_run_logger()
    report = write_run_report(pipeline, result)
    markdown = report.pop("markdown")
    create_table_artifact(
        key=ui_key("metrics", pipeline.name),
        table=report["rows"],
        description=f"pretrain-to-beir/{pipeline.name}: the model, its init, BM25 and the hybrids per dataset; "
        "deltas against the init and the previous run",
    )
    create_markdown_artifact(key=ui_key("report", pipeline.name), markdown=markdown, description="run report: metrics, lineage, config")
    for line in report["regressions"]:
        logger.warning("regression: %s", line)
    logger.info("metrics: %s", json.dumps(report["rows"]))
    return report


if __name__ == "__main__":
    pretrain_to_beir(os.environ.get("RETROFLOW_PIPELINE_CONFIG", DEFAULT_CONFIG))
