"""Flow `retromae-ablation`: the RetroMAE paper's claim in miniature (`flows.ablation`), every
step a cached task, plus a table artifact, a markdown report with the pretraining loss curves."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.ablation import ablation_dir, load_ablation_config, run_ablation, store_of
from flows.ablation_report import write_report
from flows.pretrain_to_beir import store_executor
from flows.runners import task_runner_from_env
from flows.tasks import ui_key

DEFAULT_CONFIG = "configs/ablation/miniature.yaml"


@flow(name="retromae-ablation", task_runner=task_runner_from_env())
def retromae_ablation(config: str = DEFAULT_CONFIG, overrides: list[str] | None = None) -> dict[str, Any]:
    """Pretrain each arm from scratch on one budget -> zero-shot [CLS] evaluation -> identical DPR
    fine-tuning -> evaluation, for every seed; then the arm x dataset table against the baseline."""
    ablation = load_ablation_config(config, overrides)
    store = store_of(ablation)
    result = run_ablation(ablation, *store_executor(store))
    summary = write_report(ablation, result, ablation_dir(store.root, ablation.name))
    markdown = summary.pop("markdown")
    create_table_artifact(
        key=ui_key("ablation", ablation.name),
        table=summary["rows"],
        description=f"retromae-ablation/{ablation.name}: arms x datasets, mean ± std over seeds {ablation.seeds}, "
        f"Δ and paired randomisation p against {ablation.baseline}",
    )
    create_markdown_artifact(key=ui_key("ablation-report", ablation.name), markdown=markdown, description="RetroMAE ablation report")
    get_run_logger().info("ablation %s: %d rows, report %s", ablation.name, len(summary["rows"]), summary["report"])
    return summary


if __name__ == "__main__":
    retromae_ablation(os.environ.get("RETROFLOW_ABLATION_CONFIG", DEFAULT_CONFIG))
