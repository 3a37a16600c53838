"""Copy an ablation report (`retroflow ablation`'s report JSON) into docs/results.yaml.

    python scripts/ablation_results.py <store>/ablations/continued-minilm/latest.json \
        --name continued-minilm --commit b7ef9c3 --command "retroflow ablation --config configs/ablation/continued-minilm.yaml"
    python scripts/render_results.py

Writes two tables and their figures, replacing what an earlier call wrote under the same name:
- `<name>`: arms x (fine-tuned, zero-shot) x datasets, each cell nDCG@10 (recall@100), mean ± std
  over the report's seeds;
- `<name>-primary`: the pre-registered comparisons (difference, 95% interval, p, Holm-corrected p,
  the smallest effect the study resolves).
Figure ids are `<name>.<arm>.<phase>-<dataset>.<metric>` and
`<name>.primary.<arm>-vs-<against>.<dataset>.<metric>`. Figures are taken from the report as it is:
nothing is recomputed here. A report whose primary comparisons have not all run is refused (copy it
when the study is complete), and so is a name that belongs to a table this script did not write.
The new file is checked as render_results reads it before it replaces the old one.

Standard library + PyYAML only; the file is edited as text, so its comments and layout stay.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PHASES = {"fine-tuned": "ft", "zero-shot": "zs"}
GENERATED = "scripts/ablation_results.py"  # marks the tables this script owns (and may replace)
PRIMARY_FIELDS = ("comparison", "dataset", "metric", "seeds", "queries", "delta", "ci95", "p", "p_holm", "significant")


class ReportError(ValueError):
    """The report cannot be copied as it is, or copying it would overwrite what is not its own."""


def figure_id(name: str, arm: str, phase: str, dataset: str, metric: str) -> str:
    return f"{name}.{arm}.{PHASES[phase]}-{dataset}.{metric}"


def arm_figures(report: dict, name: str, meta: dict) -> list[dict]:
    figures = []
    for row in report["rows"]:
        for metric in ("ndcg@10", "recall@100"):
            if row.get(metric) is None:
                continue
            fig = {
                "id": figure_id(name, row["arm"], row["phase"], row["dataset"], metric),
                "what": f"{name}, arm {row['arm']}, {row['phase']}, {row['dataset']} test, mean over {row['seeds']} seed(s)",
                "metric": metric,
                "value": row[metric],
            }
            if row.get(f"{metric} std") is not None:
                fig["std"] = row[f"{metric} std"]
            delta = row.get(f"{metric} Δ {report['baseline']}")
            if delta is not None:
                fig["what"] += f"; Δ {report['baseline']} {delta:+.4f} (paired p {row.get(f'{metric} p')}, secondary, uncorrected)"
            figures.append({**fig, "format": ".4f", **meta, "table": name})
    return figures


def primary_id(name: str, comparison: dict) -> str:
    arm, against = (part.strip() for part in comparison["comparison"].split(" vs "))
    return f"{name}.primary.{arm}-vs-{against}.{comparison['dataset']}.{comparison['metric']}"


def check_complete(report: dict, source: Path) -> None:
    """Every pre-registered comparison has its result (an unfinished study has 'not run yet' rows)."""
    for comparison in report.get("primary", []):
        missing = [field for field in PRIMARY_FIELDS if comparison.get(field) is None]
        if missing:
            what = comparison.get("comparison", "?")
            status = f" (status: {comparison['status']})" if comparison.get("status") else ""
            raise ReportError(
                f"{source}: primary comparison {what!r} lacks {', '.join(missing)}{status}: copy the report once the study is complete"
            )


def primary_figures(report: dict, name: str, meta: dict) -> list[dict]:
    figures = []
    for comparison in report["primary"]:
        arm, against = (part.strip() for part in comparison["comparison"].split(" vs "))
        low, high = comparison["ci95"]
        figures.append(
            {
                "id": primary_id(name, comparison),
                "what": (
                    f"{arm} minus {against}, fine-tuned, {comparison['dataset']} test {comparison['metric']}, "
                    f"{comparison['seeds']} seed(s) x {comparison['queries']} queries: 95% bootstrap CI [{low:+.4f}, {high:+.4f}], "
                    f"paired randomisation p {comparison['p']}, Holm-corrected {comparison['p_holm']} "
                    f"({'significant' if comparison['significant'] else 'not significant'} at alpha {report.get('alpha', 0.05)}); "
                    f"smallest resolvable effect {comparison['smallest_resolvable_effect']}"
                ),
                "metric": f"Δ {comparison['metric']}",
                "value": comparison["delta"],
                "format": "+.4f",
                "minus": "unicode",
                **meta,
                "table": f"{name}-primary",
            }
        )
    return figures


def tables(report: dict, name: str) -> dict:
    present = {(row["arm"], row["phase"], row["dataset"]) for row in report["rows"] if row.get("ndcg@10") is not None}
    with_recall = {
        figure_id(name, row["arm"], row["phase"], row["dataset"], "recall@100")
        for row in report["rows"]
        if row.get("recall@100") is not None
    }
    datasets = sorted({row["dataset"] for row in report["rows"]}, key=lambda d: (d != "scifact", d))
    columns = [(phase, d) for phase in PHASES for d in datasets if any((a, phase, d) in present for a in report["arms"])]
    header = ["arm"] + [f"{d}, {phase}" for phase, d in columns]
    rows = []
    for arm in report["arms"]:
        cells = [arm]
        for phase, dataset in columns:
            ndcg, recall = (figure_id(name, arm, phase, dataset, m) for m in ("ndcg@10", "recall@100"))
            if (arm, phase, dataset) not in present:
                cells.append("–")
            else:
                cells.append(f"{{{ndcg}}} ({{{recall}}})" if recall in with_recall else f"{{{ndcg}}}")
        rows.append(cells)
    seeds = report["seeds"]
    return {
        name: {
            "title": f"{name}: nDCG@10 (recall@100), mean ± std over seeds {' '.join(map(str, seeds))}",
            "generated": GENERATED,
            "header": header,
            "align": ["---"] * len(header),
            "rows": rows,
        },
        f"{name}-primary": {
            "title": f"{name}: the pre-registered primary comparisons (Holm over {len(report['primary'])})",
            "generated": GENERATED,
            "kind": "list",
            "columns": ["what", "value"],
            "ids": [primary_id(name, comparison) for comparison in report["primary"]],
        },
    }


def dump(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=10_000)


def without_old(text: str, name: str, results: Path) -> str:
    """The YAML text without the tables an earlier call wrote under `name` and every figure shown
    in them (arms since dropped or renamed included). Tables of that name that this script did not
    write are refused, not replaced."""
    tables_now = yaml.safe_load(text)["tables"]
    ours = (name, f"{name}-primary")
    for table in ours:
        if table in tables_now and tables_now[table].get("generated") != GENERATED:
            raise ReportError(f"{results}: table {table!r} was not written by {GENERATED}; choose another --name")
    head, figures = text.split("\nfigures:\n", 1)
    for table in ours:
        head = re.sub(rf"\n  {re.escape(table)}:\n(?:    .*\n|  - .*\n)*", "\n", head)
    entries = re.split(r"(?m)^(?=- id: )", figures)
    kept = [e for e in entries if not (e.startswith("- id: ") and yaml.safe_load(e)[0].get("table") in ours)]
    return head + "\nfigures:\n" + "".join(kept)


def replace_checked(results: Path, text: str) -> None:
    """Write `text` beside `results`, check it as render_results reads it, then swap it in."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import render_results

    staging = results.with_name(f".{results.name}.new")
    try:
        staging.write_text(text, encoding="utf-8")
        render_results.load(staging)
        os.replace(staging, results)
    finally:
        staging.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="the ablation's report JSON (latest.json)")
    parser.add_argument("--name", required=True, help="table name and figure-id prefix, e.g. continued-minilm")
    parser.add_argument("--commit", required=True, help="the commit the study's code ran at")
    parser.add_argument("--command", required=True, help="the command that produced the report, as the docs quote it")
    parser.add_argument("--date", default=dt.date.today().isoformat())
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.yaml")
    args = parser.parse_args(argv)

    report = json.loads(args.report.read_text(encoding="utf-8"))
    try:
        check_complete(report, args.report)
        text = without_old(args.results.read_text(encoding="utf-8"), args.name, args.results)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = {"command": args.command, "commit": args.commit, "date": args.date}
    figures = arm_figures(report, args.name, meta) + primary_figures(report, args.name, meta)
    head, rest = text.split("\ntables:\n", 1)
    table_text = "".join("  " + line + "\n" for line in dump(tables(report, args.name)).splitlines())
    text = head + "\ntables:\n" + table_text + rest.rstrip("\n") + "\n" + dump(figures)
    replace_checked(args.results, text)
    print(f"{args.results}: tables {args.name}, {args.name}-primary; {len(figures)} figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
