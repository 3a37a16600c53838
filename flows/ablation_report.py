"""The RetroMAE ablation's table and report: arm x dataset x metric, mean ± std over seeds, and a
paired randomisation test of every arm against the baseline (the project's `eval.compare`)."""

from __future__ import annotations

import statistics
from typing import Any

from eval.compare import compare_runs
from eval.report import loss_history
from flows.ablation import PHASES, AblationConfig, AblationResult, shared_pretrain_config
from flows.chain import read_evaluation

# ---------------------------------------------------------------------------------------


def per_query_over_seeds(results: list[dict[str, Any]], metrics: list[str]) -> dict[str, dict[str, float]]:
    """{metric: {qid: mean over the seeds}}: the per-query unit the paired test compares."""
    out = {}
    for metric in metrics:
        per_seed = [r["per_query"][metric] for r in results]
        qids = set().union(*per_seed)
        out[metric] = {q: statistics.fmean(s[q] for s in per_seed if q in s) for q in qids}
    return out


def summary_rows(config: AblationConfig, result: AblationResult) -> list[dict[str, Any]]:
    """One row per (phase, dataset, arm): each metric's mean ± std over seeds, and per metric the
    paired randomisation test against the baseline arm over the queries (per-query means over seeds)."""
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in result.runs:
        for (phase, dataset), art in run.evaluations.items():
            results.setdefault((phase, dataset, run.arm), []).append(read_evaluation(art))
    rows = []
    for phase in PHASES:
        for dataset in config.eval_datasets:
            base = results.get((phase, dataset, config.baseline), [])
            for arm in config.all_arms():
                scored = results.get((phase, dataset, arm))
                if not scored:
                    continue
                row: dict[str, Any] = {"phase": phase, "dataset": dataset, "arm": arm, "seeds": len(scored)}
                for metric in config.metrics:
                    values = [r[metric] for r in scored]
                    row[metric] = round(statistics.fmean(values), 4)
                    row[f"{metric} std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
                if arm != config.baseline and base:
                    comparison = compare_runs(
                        per_query_over_seeds(base, config.metrics),
                        per_query_over_seeds(scored, config.metrics),
                        metrics=config.metrics,
                        seed=0,
                    )
                    for metric, test in comparison.metrics.items():
                        row[f"{metric} Δ {config.baseline}"] = round(test.delta, 4)
                        row[f"{metric} p"] = None if test.p_randomization is None else round(test.p_randomization, 4)
                rows.append(row)
    return rows


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (family-wise error over the comparisons given; None stays None)."""
    ranked = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[i] = running
    return adjusted


def smallest_resolvable_effect(diffs_sd: float, queries: int, alpha: float, comparisons: int, power: float = 0.8) -> float:
    """The difference a two-sided paired test at alpha / comparisons (Holm's strictest step) detects
    with `power`, for per-query differences of this spread."""
    from scipy.stats import norm

    return (norm.ppf(1 - alpha / (2 * max(comparisons, 1))) + norm.ppf(power)) * diffs_sd / max(queries, 1) ** 0.5


def primary_rows(config: AblationConfig, result: AblationResult) -> list[dict[str, Any]]:
    """The pre-registered comparisons (fine-tuned): Δ with its bootstrap 95% interval, the paired
    randomisation p over queries (per-query means over seeds), Holm's adjusted p across them, and
    the smallest effect the study resolves (80% power, Holm's strictest level)."""
    import numpy as np

    by_arm: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in result.runs:
        for (phase, dataset), art in run.evaluations.items():
            if phase == "fine-tuned":
                by_arm.setdefault((dataset, run.arm), []).append(read_evaluation(art))
    rows = []
    for c in config.primary:
        a, b = by_arm.get((c.dataset, c.against)), by_arm.get((c.dataset, c.arm))
        if not a or not b:
            rows.append({"comparison": f"{c.arm} vs {c.against}", "dataset": c.dataset, "metric": c.metric, "status": "not run yet"})
            continue
        pa, pb = per_query_over_seeds(a, [c.metric])[c.metric], per_query_over_seeds(b, [c.metric])[c.metric]
        test = compare_runs({c.metric: pa}, {c.metric: pb}, metrics=[c.metric], seed=0).metrics[c.metric]
        common = sorted(set(pa) & set(pb))
        sd = float(np.std([pb[q] - pa[q] for q in common], ddof=1)) if len(common) > 1 else float("nan")
        rows.append(
            {
                "comparison": f"{c.arm} vs {c.against}",
                "dataset": c.dataset,
                "metric": c.metric,
                "seeds": min(len(a), len(b)),
                "queries": test.num_queries,
                "delta": round(test.delta, 4),
                "ci95": [round(test.ci_low, 4), round(test.ci_high, 4)] if test.ci_low is not None else None,
                "p": test.p_randomization,
                "smallest_resolvable_effect": round(smallest_resolvable_effect(sd, len(common), config.alpha, len(config.primary)), 4),
            }
        )
    adjusted = holm([r.get("p") for r in rows])
    for row, p in zip(rows, adjusted):
        if "p" in row:
            row["p"] = None if row["p"] is None else round(row["p"], 4)
            row["p_holm"] = None if p is None else round(p, 4)
            row["significant"] = p is not None and p < config.alpha
    return rows


def loss_curves(result: AblationResult) -> dict[str, list[float]]:
    """Pretraining loss per arm and seed (the `none` arm has none)."""
    return {
        f"{run.arm} (seed {run.seed})": loss_history(run.encoder)
        for run in result.runs
        if getattr(run.encoder, "stage", None) == "pretrain"
    }


def format_cell(row: dict[str, Any], metric: str) -> str:
    std = row.get(f"{metric} std")
    return f"{row[metric]:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def primary_markdown(config: AblationConfig, primary: list[dict[str, Any]]) -> list[str]:
    if not primary:
        return []
    lines = [
        "## Primary comparisons (pre-registered, fine-tuned)",
        "",
        f"Paired randomisation test over queries (per-query means over seeds), Holm's correction over "
        f"{len(primary)} comparisons at α = {config.alpha}; 95% bootstrap interval of Δ.",
        "",
        "| comparison | dataset | metric | seeds | Δ | 95% CI | p | p (Holm) | smallest resolvable Δ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in primary:
        if "delta" not in r:
            lines.append(f"| {r['comparison']} | {r['dataset']} | {r['metric']} | – | {r['status']} | | | | |")
            continue
        ci = f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" if r["ci95"] else "–"
        lines.append(
            f"| {r['comparison']} | {r['dataset']} | {r['metric']} | {r['seeds']} | {r['delta']:+.4f} | {ci} | {r['p']} | "
            f"{r['p_holm']}{' *' if r['significant'] else ''} | {r['smallest_resolvable_effect']:.4f} |"
        )
    return [*lines, ""]


def report_markdown(config: AblationConfig, rows: list[dict[str, Any]], budget: dict[str, Any], primary: list[dict[str, Any]] = ()) -> str:
    """The study as markdown: the primary comparisons, then per phase and dataset, arms × metrics
    (mean ± std, Δ and p vs baseline)."""
    lines = [
        f"# RetroMAE ablation `{config.name}`",
        "",
        f"Arms: {', '.join(config.all_arms())}; seeds {config.seeds}; baseline `{config.baseline}` "
        "(paired randomisation test over per-query means across seeds).",
        "",
        "Budget per arm: " + ", ".join(f"{k} {v}" for k, v in budget.items()),
        "",
    ]
    lines += primary_markdown(config, list(primary))
    for phase in PHASES:
        for dataset in config.eval_datasets:
            block = [r for r in rows if r["phase"] == phase and r["dataset"] == dataset]
            if not block:
                continue
            header = ["arm", *config.metrics, *(f"Δ {m} vs {config.baseline} (p)" for m in config.metrics)]
            lines += [f"## {phase}: {dataset}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for r in block:
                deltas = [
                    f"{r[f'{m} Δ {config.baseline}']:+.4f} ({r[f'{m} p']})" if f"{m} Δ {config.baseline}" in r else "–"
                    for m in config.metrics
                ]
                lines.append("| " + " | ".join([r["arm"], *(format_cell(r, m) for m in config.metrics), *deltas]) + " |")
            lines.append("")
    return "\n".join(lines)


def pretraining_budget(config: AblationConfig, result: AblationResult) -> dict[str, Any]:
    """What every arm got: steps, batch, sequence length, vocabulary, chunks and tokens seen."""
    shared = shared_pretrain_config(config, config.seeds[0])
    trained = [r.encoder for r in result.runs if getattr(r.encoder, "stage", None) == "pretrain"]
    chunks = trained[0].metrics.get("chunks") if trained else None
    steps = trained[0].metrics.get("steps") if trained else shared.train.max_steps
    tokenizer = result.artifacts.get("tokenizer")
    return {
        "init": config.init or "from scratch",
        "steps": steps,
        "epochs": trained[0].metrics.get("epochs") if trained else None,
        "batch": shared.train.batch_size,
        "max_seq_length": shared.data.max_seq_length,
        "preset": None if config.init else shared.model.preset,
        "vocab": tokenizer.metrics.get("vocab_size") if tokenizer else None,
        "corpus_documents": result.artifacts["corpus"].metrics.get("documents"),
        "corpus_chunks": chunks,
        "token_budget": steps * shared.train.batch_size * shared.data.max_seq_length if steps else None,
    }


def write_report(config: AblationConfig, result: AblationResult, out_dir) -> dict[str, Any]:
    """Table, loss curves and markdown under `out_dir` (`<store>/ablations/<name>/`); returns the
    summary that the CLI prints as its JSON line, plus the report's `markdown` the flow publishes."""
    import json
    from pathlib import Path

    from eval.report import embedded_png, plot_loss_curves
    from retroflow.publish import atomic_write_text

    out_dir = Path(out_dir)
    rows = summary_rows(config, result)
    primary = primary_rows(config, result)
    budget = pretraining_budget(config, result)
    plot = plot_loss_curves(loss_curves(result), out_dir / "pretraining-loss.png")
    markdown = report_markdown(config, rows, budget, primary)
    if plot:  # inline, as the pipeline's report: the file and the Prefect artifact are one text
        markdown += "\n## Pretraining loss\n\n" + embedded_png("pretraining loss", plot) + "\n"
    summary = {
        "ablation": config.name,
        "arms": config.all_arms(),
        "seeds": config.seeds,
        "baseline": config.baseline,
        "budget": budget,
        "primary": primary,
        "rows": rows,
        "report": str(out_dir / "report.md"),
        "loss_plot": str(plot) if plot else None,
    }
    atomic_write_text(out_dir / "report.md", markdown)
    atomic_write_text(out_dir / "latest.json", json.dumps(summary, indent=2, default=str))
    return {**summary, "markdown": markdown}
