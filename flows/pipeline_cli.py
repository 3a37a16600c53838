"""`retroflow pipeline` (the whole chain without Prefect) and `retroflow report` (a run's table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retroflow.artifacts import ArtifactStore, default_store
from retroflow.console import emit_json, format_table


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("pipeline", help="run the pretrain-to-beir chain in this process (no Prefect)")
    run.add_argument("--config", type=Path, default=Path("configs/pipeline/quickstart.yaml"))
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a pipeline field, e.g. pretrain.train.max_steps=5"
    )
    run.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every file of each stored artifact the run reuses "
        "(slow on large stores; the default check re-hashes changed files only)",
    )
    run.set_defaults(func=run_pipeline_command)
    verify = subparsers.add_parser(
        "verify", help="re-hash every file of a store's artifacts (or of one artifact); exit 1 if any is damaged"
    )
    verify.add_argument(
        "path",
        nargs="?",
        metavar="STORE_OR_ARTIFACT",
        help="a store directory or URL (its local working copy), or one artifact directory (default $RETROFLOW_STORE or ./artifacts)",
    )
    verify.set_defaults(func=verify_command)
    report = subparsers.add_parser("report", help="print the latest metric table of a pipeline run")
    report.add_argument("name", help="pipeline name (e.g. quickstart)")
    report.add_argument("--store", help="artifact store root (default $RETROFLOW_STORE or ./artifacts)")
    report.set_defaults(func=report_command)
    ablation = subparsers.add_parser(
        "ablation", help="RetroMAE vs its ablations from scratch, fine-tuned and evaluated identically (no Prefect)"
    )
    ablation.add_argument("--config", type=Path, default=Path("configs/ablation/miniature.yaml"))
    ablation.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. seeds=[1,2,3]")
    ablation.set_defaults(func=ablation_command)
    # what torchrun runs in each process of a multi-process stage (flows.stages.launch_torchrun); not for users
    stage_run = subparsers.add_parser("stage-run")
    stage_run.add_argument("stage")
    stage_run.add_argument("--config", type=Path, required=True)
    stage_run.add_argument("--inputs", type=Path, required=True)
    stage_run.add_argument("--output", type=Path, required=True)
    stage_run.set_defaults(func=stage_run_command)


def run_pipeline_command(args: argparse.Namespace) -> int:
    from flows.chain import load_pipeline_config, run_pipeline
    from flows.run_report import write_run_report

    pipeline = load_pipeline_config(args.config, [*args.set, *(["verify=true"] if args.verify else [])])
    result = run_pipeline(pipeline)
    report = write_run_report(pipeline, result)
    report.pop("markdown")
    print(format_table(report["rows"]))
    for line in report["regressions"]:
        print(f"REGRESSION: {line}")
    emit_json({**report, "model": str(getattr(result.model, "path", result.model)), "metrics": report["rows"]})
    return 0


def report_command(args: argparse.Namespace) -> int:
    from flows.chain import run_dir

    root = ArtifactStore(args.store).root if args.store else default_store().root
    latest = run_dir(root, args.name) / "latest.json"
    if not latest.is_file():
        raise FileNotFoundError(f"no finished run of pipeline '{args.name}' under {root} ({latest} missing)")
    summary = json.loads(latest.read_text())
    print(format_table(summary["rows"]))
    for line in summary.get("regressions", []):
        print(f"REGRESSION: {line}")
    print(f"report: {summary['report']}")
    emit_json(summary)
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from retroflow.artifacts import verify_all

    if args.path is None:
        root = default_store().root
    else:
        root = ArtifactStore(args.path).root if "://" in args.path else Path(args.path).expanduser()
    checked, damaged = verify_all(root)
    for label, problems in damaged.items():
        print(f"DAMAGED {label}: {'; '.join(problems)}")
    print(f"{checked} artifact(s) fully re-hashed under {root}: {len(damaged)} damaged")
    emit_json({"path": str(root), "verified": checked, "damaged": damaged})
    return 1 if damaged else 0


def ablation_command(args: argparse.Namespace) -> int:
    from flows.ablation import ablation_dir, load_ablation_config, run_ablation, store_of
    from flows.ablation_report import write_report

    config = load_ablation_config(args.config, args.set)
    result = run_ablation(config)
    summary = write_report(config, result, ablation_dir(store_of(config).root, config.name))
    summary.pop("markdown")  # written to report.md; the JSON line carries the table
    columns = [
        "phase",
        "dataset",
        "arm",
        "seeds",
        *(c for m in config.metrics for c in (m, f"{m} std", f"{m} Δ {config.baseline}", f"{m} p")),
    ]
    print(format_table(summary["rows"], columns))
    emit_json(summary)
    return 0


def stage_run_command(args: argparse.Namespace) -> int:
    import os

    from flows.stages import run_in_process_group

    metrics = run_in_process_group(args.stage, args.config, args.inputs, args.output)
    if int(os.environ.get("RANK", "0")) == 0:
        emit_json(metrics)
    return 0
