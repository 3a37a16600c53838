"""SciFact fine-tuning experiment: untouched MiniLM vs DPR with BM25 negatives vs + cross-encoder distillation.

    python bench/finetune_scifact.py [--seeds 1 2 3] [--skip-distill | --skip-dpr] [--teacher-configs A.yaml B.yaml | --teacher-dirs DIR]

Protocol (no tuning on test): 10% of SciFact's train queries (seeded) are held out as dev and
never trained on (`data.dev_fraction` in the configs); the hyperparameters in
configs/finetune/minilm-scifact*.yaml were fixed beforehand and dev nDCG@10 is reported as the
check. The cross-encoder teacher is the one thing chosen on dev: each --teacher-configs candidate
reranks BM25's top 20 for the dev queries (`retrieval.teacher.rerank_dev_check`) and the best by nDCG@10 is distilled. Each variant is trained with 3 seeds; every model is evaluated on the full corpus
(5,183 docs, exact inner-product search, top 1000) for both test and dev queries from one
corpus encoding. References in the same run: BM25 (bm25s), the untouched model, and
sentence-transformers' own encoding of each fine-tuned model (max abs difference to ours).

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

from eval.datasets import load_dataset  # noqa: E402
from eval.metrics import evaluate_run  # noqa: E402
from retroflow.artifacts import atomic_write_text  # noqa: E402
from retroflow.config import load_config  # noqa: E402
from retrieval.bm25 import BM25Retriever  # noqa: E402
from retrieval.encoder import Encoder, EncoderSettings  # noqa: E402
from retrieval.finetune import FinetuneConfig, run_finetune  # noqa: E402
from retrieval.negatives import MineNegativesConfig, run_mine_negatives  # noqa: E402
from retrieval.search import drop_self_hits, exact_search, to_run  # noqa: E402
from retrieval.teacher import TeacherConfig, run_train_teacher  # noqa: E402
from retrieval.training_data import dev_split  # noqa: E402

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
    """nDCG@10 etc. on each split from one corpus encoding (exact search, top 1000)."""
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
    return out


def evaluate_bm25(dataset, splits: dict) -> dict:
    retriever = BM25Retriever(dataset.doc_ids(), dataset.doc_texts())
    out = {}
    for name, qrels in splits.items():
        queries = query_texts(dataset, qrels)
        run = drop_self_hits(retriever.search(list(queries), list(queries.values()), 1000))
        out[name] = {**evaluate_run(qrels, run, METRICS)[0], "queries": len(queries)}
    return out


def evaluate_teacher(teacher_dir: Path, dataset, dev_fraction: float, dev_seed: int, depth: int, max_length: int) -> dict:
    """The cross-encoder reranking BM25's top `depth` for the held-out dev queries (the library's dev check)."""
    import torch

    from retrieval.teacher import load_cross_encoder, rerank_dev_check

    model, tokenizer = load_cross_encoder(teacher_dir)
    config = TeacherConfig(dev_fraction=dev_fraction, dev_seed=dev_seed, dev_check_depth=depth, max_length=max_length, score_batch_size=32)
    return rerank_dev_check(config, model, tokenizer, dataset, torch.device("cpu"), torch.float32)


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
    atomic_write_text(path, json.dumps(result, indent=2, default=str))
    return result


def summarise(rows: list[dict], split: str, metric: str) -> dict:
    values = [r["eval"][split][metric] for r in rows]
    return {
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
        "values": values,
    }


def teacher_candidates(args, work: Path) -> dict[str, tuple[str | None, Path]]:
    """{name: (config to train, or None for an already-trained teacher; its directory)}."""
    if args.teacher_dirs:
        return {f"dir-{d.name}": (None, d) for d in args.teacher_dirs}
    return {Path(c).stem: (c, work / "teachers" / Path(c).stem) for c in args.teacher_configs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--config", default=str(REPO / "configs/finetune/minilm-scifact.yaml"))
    parser.add_argument("--distill-config", default=str(REPO / "configs/finetune/minilm-scifact-distill.yaml"))
    parser.add_argument("--teacher-configs", nargs="+", help="teacher candidates; the best on dev (reranking BM25's top 20) is distilled",
                        default=[str(REPO / f"configs/finetune/{name}.yaml") for name in ("teacher-minilm-scifact", "teacher-minilm-scifact-3ep")])  # fmt: skip
    parser.add_argument("--teacher-dirs", nargs="+", type=Path, default=[],
                        help="already-trained teachers instead (the pipeline's teacher artifact or a `retroflow train-teacher` output)")  # fmt: skip
    parser.add_argument("--mine-config", default=str(REPO / "configs/finetune/mine-bm25-scifact.yaml"))
    parser.add_argument("--skip-distill", action="store_true")
    parser.add_argument("--skip-dpr", action="store_true", help="only the distillation arm (with its references)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on busy shared cores)")
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
    dpr_cfg = load_config(FinetuneConfig, args.config, [f"dataset={args.dataset}"])
    splits = split_qrels(dataset, dpr_cfg)
    report: dict = {"dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint, "seeds": args.seeds,
                    "configs": {"dpr": args.config, "distill": args.distill_config, "teachers": args.teacher_configs,
                                "mine": args.mine_config},
                    "dev_queries": len(splits["dev"]), "test_queries": len(splits["test"]), "complete": False}  # fmt: skip

    def save() -> None:
        report["wall_seconds"] = round(time.time() - began, 1)
        atomic_write_text(args.out, json.dumps(report, indent=2, default=str))

    report["bm25"] = cached(work / "bm25.json", lambda: evaluate_bm25(dataset, splits))
    save()

    mine_cfg = load_config(MineNegativesConfig, args.mine_config, [f"dataset={args.dataset}"])
    negatives = work / "negatives" / "negatives.jsonl"
    report["mining"] = cached(work / "negatives" / "metrics.json", lambda: run_mine_negatives(mine_cfg, dataset, negatives.parent))

    sample_texts = dataset.doc_texts()[:32]

    def train_and_eval(name: str, cfg: FinetuneConfig, seed: int, **files) -> dict:
        run_dir = work / f"{name}-seed{seed}"
        cfg = cfg.with_overrides(train={"seed": seed})

        def build() -> dict:
            metrics = run_finetune(cfg, dataset, cfg.init, run_dir, run_dir / "partial", **files)
            model = run_dir / "model"
            return {
                "seed": seed,
                "train": {k: metrics[k] for k in ("final_loss", "steps", "seconds", "num_train_queries", "temperature", "pooling")},
                "first_losses": metrics["loss_history"][:5],
                "eval": evaluate_model(model, dataset, splits),
                "st_max_abs_diff": st_agreement(model, sample_texts),
            }

        result = cached(run_dir / "result.json", build)
        shutil.rmtree(run_dir / "partial", ignore_errors=True)  # checkpoints: ~0.3 GB a run
        return result

    report["untouched"] = cached(work / "untouched.json", lambda: evaluate_model("minilm", dataset, splits, work / "untouched_docs.npy"))
    save()
    report["dpr"] = []
    for seed in [] if args.skip_dpr else args.seeds:
        report["dpr"].append(train_and_eval("dpr", dpr_cfg, seed, negatives_file=negatives))
        report["dpr_summary"] = {m: summarise(report["dpr"], s, m) for s in ("test", "dev") for m in METRICS[:1]}
        save()

    if not args.skip_distill:
        report["teachers"] = {}
        for name, (teacher_config, teacher_dir) in teacher_candidates(args, work).items():
            entry: dict = {"config": teacher_config, "dir": str(teacher_dir)}
            if teacher_config is not None:
                teacher_cfg = load_config(TeacherConfig, teacher_config, [f"dataset={args.dataset}"])
                max_length = teacher_cfg.max_length

                def train_teacher(cfg=teacher_cfg, out=teacher_dir) -> dict:
                    trained = run_train_teacher(cfg, dataset, negatives, out, out / "partial")
                    shutil.rmtree(out / "partial", ignore_errors=True)
                    return {k: v for k, v in trained.items() if k != "loss_history"}

                entry["train"] = cached(teacher_dir / "result.json", train_teacher)
            else:  # trained elsewhere (the pipeline's teacher artifact): its manifest says how
                manifest = json.loads((teacher_dir / "manifest.json").read_text()) if (teacher_dir / "manifest.json").is_file() else {}
                entry["train"] = {k: v for k, v in manifest.get("metrics", {}).items() if k != "loss_history"}
                entry["train_config"] = manifest.get("config")
                max_length = (manifest.get("config") or {}).get("max_length", 192)
            entry["dev"] = cached(work / "teachers" / name / "dev-check.json",
                                  lambda d=teacher_dir, n=max_length: evaluate_teacher(d / "teacher", dataset, dpr_cfg.data.dev_fraction,
                                                                                       dpr_cfg.data.dev_seed, 20, n))  # fmt: skip
            report["teachers"][name] = entry
            save()
        chosen = max(report["teachers"], key=lambda n: report["teachers"][n]["dev"]["dev_teacher_rerank_ndcg@10"])
        report["teacher_chosen_on_dev"] = chosen
        scores_file = Path(report["teachers"][chosen]["dir"]) / "teacher_scores.jsonl"
        distill_cfg = load_config(FinetuneConfig, args.distill_config, [f"dataset={args.dataset}"])
        report["distill"] = []
        for seed in args.seeds:
            report["distill"].append(train_and_eval(f"distill-{chosen}", distill_cfg, seed, teacher_scores_file=scores_file))
            save()

    table = []
    base = report["untouched"]["test"]["ndcg@10"]
    for variant in ("dpr", "distill"):
        rows = report.get(variant) or []
        if not rows:
            continue
        test = summarise(rows, "test", "ndcg@10")
        dev = summarise(rows, "dev", "ndcg@10")
        table.append({"variant": variant, "test_ndcg@10_mean": test["mean"], "test_ndcg@10_std": test["std"],
                      "dev_ndcg@10_mean": dev["mean"], "dev_ndcg@10_std": dev["std"],
                      "test_recall@100_mean": summarise(rows, "test", "recall@100")["mean"],
                      "ratio_to_untouched": test["mean"] / base,
                      "every_seed_above_untouched": all(v > base for v in test["values"]), "seeds": len(rows)})  # fmt: skip
    report["table"] = table
    report["complete"] = True
    save()
    print(json.dumps({"table": table, "untouched_test_ndcg@10": base, "bm25_test_ndcg@10": report["bm25"]["test"]["ndcg@10"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
