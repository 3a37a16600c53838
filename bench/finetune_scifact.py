"""SciFact fine-tuning benchmark: untouched MiniLM, BM25, hybrid(untouched), DPR, DPR + fusion-teacher distillation, hybrid(best).

    python bench/finetune_scifact.py [--seeds 1 2 3] [--skip-distill | --skip-dpr] [--check-dataset ../shared/data/trec-dl-2019-subset5k]
                                     [--model minilm]

Protocol (no tuning on test): 10% of SciFact's train queries (seeded) are held out as dev and
never trained on (`data.dev_fraction` in the configs); every setting in
configs/finetune/minilm-scifact*.yaml and every fusion weight is chosen on that dev slice, and
dev nDCG@10 is reported beside test. Each trained variant runs once per seed; every model is
evaluated on the full corpus (5,183 docs, exact inner-product search, top 1000) from one corpus
encoding, which also serves its hybrid (BM25 fused with it, min-max, weight chosen on dev). The
fusion teacher (BM25 + untouched MiniLM) is built once and distilled by each distillation seed.
Each trained model is also scored on `--check-dataset` (TREC-DL subset: no training data, so its
hybrid weight comes from pseudo-queries) to show it did not overfit SciFact: the figure to read
is its delta against the untouched model there.

Every finished step is cached under --work (re-running skips it), and the JSON result is
rewritten after each step with `"complete": false` until everything has run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.provenance import shown_path  # noqa: E402
from retrieval.serving.bm25 import BM25Retriever  # noqa: E402
from retrieval.serving.encoder import Encoder, EncoderSettings  # noqa: E402
from retrieval.serving.search import drop_self_hits, exact_search, to_run  # noqa: E402
from retrieval.training import finetune, teacher  # noqa: E402
from retrieval.training.finetune import FinetuneConfig  # noqa: E402
from retrieval.training.teacher import TeacherConfig  # noqa: E402
from retroflow.config import load_config  # noqa: E402
from retroflow.data import dataset_input  # noqa: E402
from retroflow.data.beir import load_dataset  # noqa: E402
from retroflow.data.splits import dev_split  # noqa: E402
from retroflow.inputs import inputs_of, model_input, path_input  # noqa: E402
from retroflow.metrics import evaluate_run  # noqa: E402
from retroflow.publish import atomic_write_text  # noqa: E402

log = logging.getLogger("bench.finetune_scifact")
METRICS = ["ndcg@10", "recall@100", "mrr@10"]


def split_qrels(dataset, config: FinetuneConfig) -> dict[str, dict]:
    """{'test': qrels, 'dev': train qrels of the held-out dev queries}."""
    train = dataset.split_qrels("train")
    _, dev = dev_split(train, config.data.dev_fraction, config.data.dev_seed)
    return {"test": dataset.split_qrels("test"), "dev": {q: train[q] for q in dev}}


def query_texts(dataset, qrels: dict) -> dict[str, str]:
    text = dict(zip(dataset.queries.column("_id").to_pylist(), dataset.queries.column("text").to_pylist()))
    return {q: text[q] for q in qrels}


def evaluate_model(model: str | Path, dataset, splits: dict, doc_cache: Path | None = None) -> dict:
    """Dense and hybrid nDCG@10 etc. on each split from one corpus encoding (exact search, top 1000)."""
    from retrieval.serving.hybrid import FusionSettings, HybridSearcher, dense_side, dev_hold_out, fuse_minmax

    encoder = Encoder(model, EncoderSettings(show_progress=False))
    started = time.perf_counter()
    if doc_cache is not None and doc_cache.is_file():
        docs = np.load(doc_cache)
    else:
        docs = encoder.encode_passages(dataset.doc_texts())
        if doc_cache is not None:
            np.save(doc_cache, docs)
    encode_s = time.perf_counter() - started
    out = {"encode_seconds": round(encode_s, 1), "pooling": encoder.pooling, "normalize": encoder.normalize}
    for name, qrels in splits.items():
        queries = query_texts(dataset, qrels)
        vectors = encoder.encode_queries(list(queries.values()))
        scores, indices = exact_search(docs, vectors, 1000)
        run = drop_self_hits(to_run(list(queries), dataset.doc_ids(), scores, indices))
        means, _ = evaluate_run(qrels, run, METRICS)
        out[name] = {**means, "queries": len(queries)}
    texts = dataset.doc_texts()
    fusion = FusionSettings()
    searcher = HybridSearcher(
        dense_side(encoder, dataset.doc_ids(), texts, doc_vectors=docs), BM25Retriever(dataset.doc_ids(), texts), fusion, texts
    )
    held_out = dev_hold_out(dataset, fusion, evaluated_split="test")
    selection = searcher.select_weight(*(held_out or (None, None)))
    dense, bm25 = searcher.side_runs(query_texts(dataset, splits["test"]))
    out["hybrid"] = {
        "fusion": {k: v for k, v in selection.items() if k != "by_weight"},
        "test": evaluate_run(splits["test"], fuse_minmax(dense, bm25, selection["weight"], fusion.depth), METRICS)[0],
    }
    return out


def evaluate_bm25(dataset, splits: dict) -> dict:
    retriever = BM25Retriever(dataset.doc_ids(), dataset.doc_texts())
    out = {}
    for name, qrels in splits.items():
        queries = query_texts(dataset, qrels)
        run = drop_self_hits(retriever.search(list(queries), list(queries.values()), 1000))
        out[name] = {**evaluate_run(qrels, run, METRICS)[0], "queries": len(queries)}
    return out


def st_agreement(model_dir: Path, texts: list[str]) -> float:
    """Max |difference| between sentence-transformers' and retroflow's embeddings of `texts`."""
    from sentence_transformers import SentenceTransformer

    ours = Encoder(model_dir, EncoderSettings(show_progress=False)).encode_passages(texts)
    theirs = SentenceTransformer(str(model_dir), device="cpu").encode(texts, convert_to_numpy=True, batch_size=16)
    return float(np.abs(ours - theirs).max())


def cached(path: Path, build):
    if path.is_file():
        return json.loads(path.read_text())
    result = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2, default=str))
    return result


def summarise(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
        "values": values,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "data" / "scifact"))
    parser.add_argument(
        "--check-dataset",
        default=str(REPO.parent / "shared" / "data" / "trec-dl-2019-subset5k"),
        help="a corpus not trained on: each model's delta against the untouched one there ('' = skip)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--model", default="minilm", help="the untouched model: where fine-tuning starts, the fusion teacher's dense side")
    parser.add_argument("--config", default=str(REPO / "configs/finetune/minilm-scifact.yaml"))
    parser.add_argument("--distill-config", default=str(REPO / "configs/finetune/minilm-scifact-distill.yaml"))
    parser.add_argument("--teacher-config", default=str(REPO / "configs/teacher/fusion-scifact.yaml"))
    parser.add_argument("--skip-distill", action="store_true")
    parser.add_argument("--skip-dpr", action="store_true", help="only the distillation arm (with its references)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--work", type=Path, default=REPO / "bench/results/finetune_scifact_work")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/finetune_scifact.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    work = args.work
    import torch

    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    began = time.time()

    dataset = load_dataset(args.dataset)
    data, start = dataset_input(dataset), model_input(args.model)
    check = load_dataset(args.check_dataset) if args.check_dataset else None
    check_splits = {"test": check.split_qrels("test")} if check else {}
    dpr_cfg = load_config(FinetuneConfig, args.config)
    splits = split_qrels(dataset, dpr_cfg)
    report: dict = {
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "model": args.model,
        "seeds": args.seeds,
        "configs": {"dpr": shown_path(args.config), "distill": shown_path(args.distill_config), "teacher": shown_path(args.teacher_config)},
        "dev_queries": len(splits["dev"]),
        "test_queries": len(splits["test"]),
        "complete": False,
    }

    def save() -> None:
        report["wall_seconds"] = round(time.time() - began, 1)
        atomic_write_text(args.out, json.dumps(report, indent=2, default=str))

    report["bm25"] = cached(work / "bm25.json", lambda: evaluate_bm25(dataset, splits))
    report["untouched"] = cached(work / "untouched.json", lambda: evaluate_model(args.model, dataset, splits, work / "untouched_docs.npy"))
    if check:
        report["check_untouched"] = cached(work / "check-untouched.json", lambda: evaluate_model(args.model, check, check_splits))
    save()
    sample_texts = dataset.doc_texts()[:32]

    def train_and_eval(name: str, cfg: FinetuneConfig, seed: int, teacher_scores: Path | None = None) -> dict:
        run_dir = work / f"{name}-seed{seed}"
        cfg = cfg.with_overrides(train={"seed": seed})

        def build() -> dict:
            model = run_dir / "model"
            if (model / "config.json").is_file() and (run_dir / "metrics.json").is_file():
                # trained before (a `retroflow finetune --output run_dir` with this config and seed): evaluate only
                metrics = json.loads((run_dir / "metrics.json").read_text())
            else:
                inputs = inputs_of(data=data, model=start, teacher=path_input(teacher_scores) if teacher_scores else None)
                metrics = finetune.run(cfg, inputs, run_dir, run_dir / "partial")
            result = {
                "seed": seed,
                "train": {
                    k: metrics.get(k)
                    for k in (
                        "final_loss",
                        "steps",
                        "seconds",
                        "num_train_queries",
                        "num_train_rows",
                        "temperature",
                        "distill",
                        "distill_gate",
                    )
                },
                "eval": evaluate_model(model, dataset, splits),
                "st_max_abs_diff": st_agreement(model, sample_texts),
            }
            if check:
                result["check"] = evaluate_model(model, check, check_splits)
            return result

        result = cached(run_dir / "result.json", build)
        shutil.rmtree(run_dir / "partial", ignore_errors=True)  # checkpoints: ~0.3 GB a run
        return result

    report["dpr"] = []
    for seed in [] if args.skip_dpr else args.seeds:
        report["dpr"].append(train_and_eval("dpr", dpr_cfg, seed))
        save()
    if not args.skip_distill:
        teacher_cfg = load_config(TeacherConfig, args.teacher_config)
        teacher_dir = work / "teacher-fusion"
        report["teacher"] = cached(
            teacher_dir / "result.json",
            lambda: teacher.run(teacher_cfg, inputs_of(data=data, init=start), teacher_dir, teacher_dir / "partial"),
        )
        distill_cfg = load_config(FinetuneConfig, args.distill_config)
        report["distill"] = []
        for seed in args.seeds:
            report["distill"].append(
                train_and_eval("distill-fusion", distill_cfg, seed, teacher_scores=teacher_dir / "teacher_scores.jsonl")
            )
            save()

    base = report["untouched"]["test"]["ndcg@10"]
    table = [
        {"variant": "untouched", "test_ndcg@10": base, "dev_ndcg@10": report["untouched"]["dev"]["ndcg@10"]},
        {"variant": "bm25", "test_ndcg@10": report["bm25"]["test"]["ndcg@10"], "dev_ndcg@10": report["bm25"]["dev"]["ndcg@10"]},
        {
            "variant": "hybrid(untouched)",
            "test_ndcg@10": report["untouched"]["hybrid"]["test"]["ndcg@10"],
            "fusion_weight": report["untouched"]["hybrid"]["fusion"]["weight"],
        },
    ]
    for variant in ("dpr", "distill"):
        rows = report.get(variant) or []
        if not rows:
            continue
        test = summarise([r["eval"]["test"]["ndcg@10"] for r in rows])
        hybrid = summarise([r["eval"]["hybrid"]["test"]["ndcg@10"] for r in rows])
        entry = {
            "variant": variant,
            "test_ndcg@10_mean": test["mean"],
            "test_ndcg@10_std": test["std"],
            "dev_ndcg@10_mean": summarise([r["eval"]["dev"]["ndcg@10"] for r in rows])["mean"],
            f"hybrid({variant})_test_ndcg@10_mean": hybrid["mean"],
            f"hybrid({variant})_test_ndcg@10_std": hybrid["std"],
            "ratio_to_untouched": test["mean"] / base,
            "every_seed_above_untouched": all(v > base for v in test["values"]),
            "seeds": len(rows),
        }
        if check and all("check" in r for r in rows):
            check_base = report["check_untouched"]["test"]["ndcg@10"]
            entry["check_delta_vs_untouched_mean"] = statistics.mean(r["check"]["test"]["ndcg@10"] - check_base for r in rows)
        table.append(entry)
    report["table"] = table
    report["complete"] = True
    save()
    print(json.dumps({"table": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
