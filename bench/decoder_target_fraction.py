"""What decoder-row subsampling (`decoder_target_fraction`) does to RetroMAE pretraining.

Enhanced decoding makes every token a target; `decoder_target_fraction: f` keeps a random
fraction f of the decoder's rows as targets per step (the same objective, fewer targets, a
cheaper vocabulary projection). This runs one ablation config's enhanced arm at each fraction for
one seed, from the same tokenizer, text, initial weights and data order (the ablation's own
artifacts, so nothing but the fraction differs), and reports per fraction: the losses (encoder MLM,
decoder per target token), steps/s, and zero-shot [CLS] retrieval on the evaluation datasets.
The reference is fraction 1.0 (the paper's objective), measured in the same run.

    RETROFLOW_DATA_DIR=../shared/data python bench/decoder_target_fraction.py \\
        [--config configs/ablation/miniature.yaml] [--seed 1] [--fractions 1.0 0.25] [--output bench/results/decoder_target_fraction.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.ablation import OBJECTIVES, corpus_config, data_root_datasets, evaluate_config, load_ablation_config, shared_pretrain_config  # noqa: E402
from flows.chain import evaluation, prepare_data, read_evaluation, store_for  # noqa: E402
from flows.stages import build  # noqa: E402
from retromae.pretrain import tokenizer_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "ablation" / "miniature.yaml")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ablation config override")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "decoder_target_fraction.json")
    args = parser.parse_args()

    config = load_ablation_config(args.config, args.set)
    store = store_for(config)
    names = config.pretrain_corpora if config.pretrain_corpora is not None else data_root_datasets(config)
    corpora = {f"corpus{i}": prepare_data(store, name, config.data_dir) for i, name in enumerate(names)}
    corpus = build(store, "corpus", corpus_config(list(config.pretrain_files)), corpora)
    base = shared_pretrain_config(config, args.seed).with_overrides(**OBJECTIVES["retromae-enhanced"])
    tokenizer = build(store, "tokenizer", tokenizer_config(base), {"data": corpus})
    datasets = {name: prepare_data(store, name, config.data_dir) for name in config.eval_datasets}

    rows = []
    for fraction in args.fractions:
        started = time.perf_counter()
        encoder = build(store, "pretrain", base.with_overrides(decoder_target_fraction=fraction), {"data": corpus, "tokenizer": tokenizer})
        row = {
            "decoder_target_fraction": fraction,
            "pretrain_artifact": str(encoder.path),
            "seconds": round(time.perf_counter() - started, 1),
        }
        metrics = encoder.metrics
        row.update({k: metrics.get(k) for k in ("steps", "steps_per_s", "final_loss")})
        history = json.loads(encoder.file("loss_history.json").read_text())
        for name in ("encoder_loss", "decoder_loss"):  # mean of the last 10 steps, as final_loss
            tail = (history.get(f"{name}_history") or [])[-10:]
            row[f"final_{name}"] = round(sum(tail) / len(tail), 4) if tail else None
        for name, data in datasets.items():
            result = read_evaluation(build(store, "evaluate", *evaluation(evaluate_config(config), "dense", data, encoder)))
            row.update({f"zero-shot {name} {m}": result.get(m) for m in config.metrics})
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = rows[0]
    for row in rows:
        if reference.get("steps_per_s") and row.get("steps_per_s"):
            row["speed_vs_reference"] = round(row["steps_per_s"] / reference["steps_per_s"], 3)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {
        "command": " ".join(["python", "bench/decoder_target_fraction.py", *sys.argv[1:]]),
        "commit": commit,
        "config": str(args.config),
        "seed": args.seed,
        "reference_fraction": reference["decoder_target_fraction"],
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
