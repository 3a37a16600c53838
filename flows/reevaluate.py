"""Flow `reevaluate`: score a model (or index) on datasets and compare with the previous run.

Each dataset's evaluation is a cached task (same model content + data + config = same
result). The metrics are recorded in the run registry and compared, query by query, with
the previous run of the same model label; significant drops beyond the threshold produce a
marked artifact and put the flow run in a Failed state.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from eval.report import markdown_table, metric_rows
from flows.chain import (
    PipelineConfig,
    evaluation,
    external_model,
    prepare_data,
    previous_records,
    read_evaluation,
    record_evaluations,
    regressions,
    section_config,
    store_for,
)
from flows.pretrain_to_beir import task_executor
from flows.stages import build
from flows.tasks import ui_key
from retroflow.artifacts import open_verified


def model_reference(model: str):
    """An artifact directory (with manifest.json) or anything `resolve_model_path` accepts."""
    from pathlib import Path

    if (Path(model) / "manifest.json").is_file():
        return open_verified(model)
    return external_model(model)


@flow(name="reevaluate")
def reevaluate(
    model: str = "minilm",
    datasets: list[str] | None = None,
    split: str = "test",
    index: str | None = None,
    label: str | None = None,
    threshold: float = 0.01,
    evaluate: dict[str, Any] | None = None,
    store: str = "artifacts",
    data_dir: str | None = None,
) -> dict[str, Any]:
    logger = get_run_logger()
    pipeline = PipelineConfig(
        name=label or f"reevaluate-{ui_key(model)[-40:]}",
        store=store,
        data_dir=data_dir,
        model=model,
        eval_datasets=datasets or ["scifact"],
        eval_split=split,
        evaluate=evaluate or {},
        regression_threshold=threshold,
    )
    execute, _ = task_executor(pipeline)
    artifact_store = store_for(pipeline)
    model_ref = model_reference(model)
    index_ref = open_verified(index) if index else None
    config = section_config(pipeline, "evaluate")
    arts = {}
    for source in pipeline.eval_datasets:
        data = execute("data", prepare_data, artifact_store, source, data_dir)
        arts[source] = execute("evaluate", build, artifact_store, "evaluate", *evaluation(config, "dense", data, model_ref, index_ref))
    results = {name: read_evaluation(art) for name, art in arts.items()}
    record_evaluations(pipeline, arts, results)
    previous = previous_records(pipeline, arts, results)
    rows = metric_rows(results, {k: rec.metrics for k, rec in previous.items() if rec is not None})
    flagged = regressions(pipeline, results, previous)
    create_table_artifact(key=ui_key("reevaluate", pipeline.name), table=rows, description=f"re-evaluation of {model}")
    if flagged:
        body = "# ⚠ REGRESSION\n\n" + "\n".join(f"- {line}" for line in flagged) + "\n\n" + markdown_table(rows)
        create_markdown_artifact(key=ui_key("regression", pipeline.name), markdown=body, description="metric drops vs the previous run")
        for line in flagged:
            logger.error("regression: %s", line)
        return Failed(message=f"{len(flagged)} regression(s): " + "; ".join(flagged))
    return {"rows": rows, "regressions": []}
