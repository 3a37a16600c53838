"""What a finished pretrain-to-beir run leaves behind (one writer for `retroflow pipeline` and the flow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval.report import embedded_png, loss_history, metric_rows, plot_loss_curves, run_report_markdown
from flows.chain import export_model, previous_records, read_evaluation, record_evaluations, regressions, run_dir, store_for
from retroflow.publish import atomic_write_text


def write_run_report(pipeline, result) -> dict[str, Any]:
    """Everything a finished pretrain-to-beir run leaves behind, with or without Prefect: the
    evaluations recorded in the run registry, the metric table (model, init, BM25, hybrids, deltas),
    regressions against the previous run, `runs/<name>/report.md` (loss and recall-vs-QPS plots
    inline), `runs/<name>/latest.json` (what `retroflow report` prints) and the exported model."""
    evaluations = {name: read_evaluation(art) for name, art in result.evaluations.items()}
    record_evaluations(pipeline, result.evaluations, evaluations)
    previous = previous_records(pipeline, result.evaluations, evaluations)
    references = {source: {name: read_evaluation(art) for name, art in refs.items()} for source, refs in result.references.items()}
    rows = metric_rows(evaluations, {k: rec.metrics for k, rec in previous.items() if rec is not None}, references=references)
    flagged = regressions(pipeline, evaluations, previous)
    folder = run_dir(store_for(pipeline).root, pipeline.name)
    markdown = run_report_markdown(
        pipeline.name,
        pipeline.canonical(),
        rows,
        [*result.evaluations.values(), *(a for refs in result.references.values() for a in refs.values())],
        flagged,
        report_sections(result, folder, pipeline),
    )
    summary = {
        "pipeline": pipeline.name,
        "rows": rows,
        "regressions": flagged,
        "report": str(folder / "report.md"),
        "shard_workers": sorted({r.get("worker_pid") for r in result.shard_results if isinstance(r, dict)}),
    }
    exported = export_model(pipeline, result, rows)
    summary["model_dir"] = str(exported) if exported else None
    atomic_write_text(folder / "report.md", markdown)
    atomic_write_text(folder / "latest.json", json.dumps(summary, indent=2, default=str))
    return {**summary, "markdown": markdown}


def heldout_table(pretrain) -> str | None:
    """The pretrain stage's held-out reconstruction losses as a markdown table (None without a held-out slice)."""
    metrics = getattr(pretrain, "metrics", None) or {}
    steps = metrics.get("heldout_step_history") or []
    if not steps:
        return None
    encoder = metrics.get("heldout_encoder_loss_history") or []
    decoder = metrics.get("heldout_decoder_loss_history") or [None] * len(steps)
    rows = ["| step | encoder MLM loss | decoder loss |", "|---:|---:|---:|"]
    rows += [f"| {int(s)} | {e:.4f} | {'–' if d is None else f'{d:.4f}'} |" for s, e, d in zip(steps, encoder, decoder)]
    return "\n".join(rows)


def index_section(result, pipeline) -> str | None:
    """What each index and its tuning cost and chose, and whether the metric table searched through it:
    an index built but not searched through must still show what it took."""
    lines = []
    for name, art in result.artifacts.items():
        if not name.startswith("index:"):
            continue
        source = name.removeprefix("index:")
        tuned = result.artifacts.get(f"tune:{source}")
        evaluation = result.evaluations.get(source)
        used = evaluation is not None and "index" in evaluation.manifest.get("inputs", {})
        docs = art.metrics.get("ntotal")
        lines.append(
            f"- **{source}**: `{art.metrics.get('factory')}` over {docs} documents, built in {art.manifest.get('seconds')} s"
            + (f", tuned in {tuned.manifest.get('seconds')} s" if tuned is not None else "")
            + "."
        )
        if tuned is not None:
            m = tuned.metrics
            dev = m.get("dev") or {}
            figures = "; ".join(f"{k} {v}" for k, v in dev.items() if k.startswith("exact_ndcg") or k.startswith("ndcg"))
            lines.append(
                f"  Chose `{m.get('search_params')}`: {m.get('rule')}"
                + (" (met)" if m.get("target_met") else " (**not met**)")
                + (f"; on {dev.get('num_queries')} dev queries: {figures}" if dev else "")
                + f"; recall@{m.get('k')} {m.get('recall')}, {m.get('speedup_vs_exact')}x exact search's queries/s on held-out queries."
            )
        if used:
            lines.append("  The metric table searched through it (the `exact` columns show exact search beside it).")
        else:
            lines.append(
                f"  Not searched through: {docs} documents < exact_below_docs {pipeline.exact_below_docs}, "
                "so every dense row is exact search."
            )
    return "\n".join(lines) or None


def report_sections(result, run_dir: Path, pipeline=None) -> dict[str, str]:
    """The report's sections beyond the table: training loss, the distillation gate, the index's cost, recall vs QPS."""
    sections = {}
    curves = {stage: loss_history(art) for stage, art in result.artifacts.items() if stage in ("pretrain", "finetune", "teacher")}
    plot = plot_loss_curves(curves, run_dir / "loss.png")
    if plot:
        sections["Training loss"] = embedded_png("training loss", plot)
    finetune = result.artifacts["finetune"].metrics if "finetune" in result.artifacts else {}
    start = finetune.get("pretrain_gate")
    if start:
        sections["Pretrain gate"] = (
            "Fine-tuned from the pretrained model: "
            if start["start"] == "pretrained"
            else "**Pretraining discarded**, fine-tuned from the init: "
        ) + start["reason"]
    heldout = heldout_table(result.artifacts.get("pretrain"))
    if heldout:
        sections["Pretraining held-out loss"] = heldout
    gate = finetune.get("distill_gate")
    if gate:
        sections["Distillation gate"] = ("Distilled from the teacher: " if gate["distilled"] else "**Not distilled**: ") + gate["reason"]
    index = index_section(result, pipeline) if pipeline is not None else None
    if index:
        sections["Index"] = index
    for name, art in result.artifacts.items():
        if name.startswith("tune:") and art.file("tune.png").is_file():
            sections[f"Recall vs QPS ({name.removeprefix('tune:')})"] = embedded_png("recall@10 vs queries/s", art.file("tune.png"))
    return sections
