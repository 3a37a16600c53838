"""Run reports built from manifests and evaluation results: tables, markdown, plots.

Plain functions returning data (rows, markdown text, PNG files); `flows/` turns them into
Prefect artifacts and the CLI prints them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from retroflow.artifacts import Artifact, lineage
from retroflow.publish import publishing_file

REPORT_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100")


DELTA_METRICS = ("ndcg@10", "recall@100")


def metric_rows(
    results: Mapping[str, Mapping[str, Any]],
    previous: Mapping[str, Mapping[str, float]] | None = None,
    metrics: Sequence[str] = REPORT_METRICS,
    references: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Per dataset: the produced model's row (each metric, the previous run's value and delta),
    then one row per reference system (hybrid, init, hybrid(init), BM25); every row carries its
    delta against the init model, so the table says whether training helped."""
    rows = []
    for dataset, result in results.items():
        refs = (references or {}).get(dataset) or {}
        init = refs.get("init")
        row = system_row(dataset, "model", result, metrics, init)
        before = (previous or {}).get(dataset) or {}
        for metric in metrics:
            if metric in result and metric in before:
                row[f"{metric} (prev)"] = round(float(before[metric]), 4)
                row[f"{metric} Δ prev"] = round(float(result[metric]) - float(before[metric]), 4)
        rows.append(row)
        rows.extend(system_row(dataset, name, ref, metrics, init) for name, ref in refs.items())
    return rows


def system_row(
    dataset: str, system: str, result: Mapping[str, Any], metrics: Sequence[str], init: Mapping[str, Any] | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"dataset": dataset, "system": system, "model": result.get("model"), "queries": result.get("num_queries")}
    for metric in metrics:
        if metric in result:
            row[metric] = round(float(result[metric]), 4)
    for metric in DELTA_METRICS:
        if init is not None and metric in result and metric in init:
            row[f"{metric} Δ init"] = round(float(result[metric]) - float(init[metric]), 4)
    row.update(search_columns(result))
    fusion = result.get("fusion")
    if isinstance(fusion, Mapping):
        weight = fusion.get("weight")
        row["fusion"] = (
            f"{fusion.get('method')} w={weight} ({fusion.get('chosen_on')})" if weight is not None else str(fusion.get("method"))
        )
    return row


def search_columns(result: Mapping[str, Any], metrics: Sequence[str] = DELTA_METRICS) -> dict[str, Any]:
    """How a row was searched and, when through an approximate index, the exact-search figures
    beside it and what the index costs (`Δ index` = through the index minus exact)."""
    search = result.get("search")
    if not isinstance(search, Mapping):
        return {}
    columns: dict[str, Any] = {"search": search.get("label")}
    exact = result.get("exact_search")
    if search.get("approximate") and isinstance(exact, Mapping):
        for metric in metrics:
            if metric in exact and metric in result:
                columns[f"{metric} exact"] = round(float(exact[metric]), 4)
                columns[f"{metric} Δ index"] = round(float(result[metric]) - float(exact[metric]), 4)
    return columns


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "_no rows_"
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}" if value < 0 else f"{value:.4f}"
    return "" if value is None else str(value)


def lineage_markdown(artifacts: Iterable[Artifact]) -> str:
    lines = ["| stage | key | seconds | code | path |", "|---|---|---|---|---|"]
    seen = set()
    for art in artifacts:
        for step in lineage(art):
            if step["path"] in seen:
                continue
            seen.add(step["path"])
            indent = "↳ " * step["depth"]
            lines.append(f"| {indent}{step['stage']} | `{step['key']}` | {step['seconds']} | `{step['code_version']}` | `{step['path']}` |")
    return "\n".join(lines)


def run_report_markdown(
    name: str,
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    final_artifacts: Sequence[Artifact],
    regressions: Sequence[str] = (),
    extra_sections: Mapping[str, str] | None = None,
) -> str:
    parts = [f"# pretrain-to-beir: {name}", "", "## Metrics", "", markdown_table(rows), ""]
    if regressions:
        parts += ["## ⚠ Regressions against the previous run", ""] + [f"- {r}" for r in regressions] + [""]
    parts += ["## Lineage (each artifact and the artifacts it was made from)", "", lineage_markdown(final_artifacts), ""]
    for title, body in (extra_sections or {}).items():
        parts += [f"## {title}", "", body, ""]
    parts += ["## Config", "", "```json", json.dumps(config, indent=2, default=str), "```"]
    return "\n".join(parts)


def plot_loss_curves(curves: Mapping[str, Sequence[float]], path: Path) -> Path | None:
    """Training loss per stage (x = logged step index) as a PNG; None when there is nothing to plot."""
    curves = {k: list(v) for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    ax.set_xlabel("logged step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # Renamed into place whole: two runs of one pipeline share its run folder, and one may be
    # embedding the plot in its report while the other writes it.
    with publishing_file(Path(path)) as staging:
        fig.savefig(staging, format="png")
    plt.close(fig)
    return path


def loss_history(art: Artifact) -> list[float]:
    """A stage's logged losses, from its metrics or its loss_history.json."""
    history = art.metrics.get("loss_history")
    if not history and art.file("loss_history.json").is_file():
        history = json.loads(art.file("loss_history.json").read_text())
    values = []
    for item in history or []:
        values.append(float(item["loss"]) if isinstance(item, Mapping) else float(item))
    return values


def embedded_png(title: str, path: Path) -> str:
    """Markdown showing a PNG inline (the Prefect UI and most viewers render data URIs) plus where the file is."""
    import base64

    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{encoded})\n\nFile: `{path}`"
