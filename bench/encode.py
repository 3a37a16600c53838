"""Encoding speed: retroflow's Encoder vs sentence-transformers' `encode`, same model, texts, run.

    python bench/encode.py [--docs 300] [--trials 3] [--model minilm] [--out bench/results/encode.json]

Texts are real SciFact passages (`title + " " + text`, as BEIR joins them), a seeded random
sample of the corpus so the length mix is the corpus's own. Both sides use max length 256 and
the same torch thread count in the same process. sentence-transformers runs at batch 32 (its
default) and 64 (our default); the ratio is taken against whichever of the two was faster.
Trials alternate (ST-32, ST-64, retroflow, repeat) because the 2 cores are shared and noisy;
each figure is the median over trials. Deviation = the largest 1 - cosine between the two
embeddings of any text. The JSON is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.serving.encoder import Encoder, EncoderSettings  # noqa: E402
from retroflow.models import resolve_model_path  # noqa: E402
from retroflow.publish import atomic_write_text  # noqa: E402

MAX_LENGTH = 256
ST_BATCH_SIZES = (32, 64)


def read_passages(corpus: Path, n_docs: int, seed: int) -> list[str]:
    docs = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    sample = random.Random(seed).sample(docs, min(n_docs, len(docs)))
    return [(d.get("title", "") + " " + d["text"]).strip() for d in sample]


def max_cosine_deviation(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float((1.0 - cos).max())


def timed(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    vectors = fn()
    return time.perf_counter() - start, vectors


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "data" / "scifact" / "corpus.jsonl")
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=["auto", "fused", "hf"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encode.json")
    args = parser.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    texts = read_passages(args.corpus, args.docs, args.seed)
    ours = Encoder(args.model, EncoderSettings(show_progress=False, passage_max_length=MAX_LENGTH, backend=args.backend))
    st = SentenceTransformer(str(resolve_model_path(args.model)), device="cpu")
    st.max_seq_length = MAX_LENGTH
    lengths = [len(x) for x in ours.tokenize(texts, MAX_LENGTH)]

    runners = {
        f"sentence_transformers_bs{bs}": (lambda bs=bs: st.encode(texts, batch_size=bs, convert_to_numpy=True)) for bs in ST_BATCH_SIZES
    }
    runners["retroflow"] = lambda: ours.encode_passages(texts)
    # warm-up: first-call allocations and lazy imports
    st.encode(texts[:8], batch_size=8)
    ours.encode_passages(texts[:8])

    seconds: dict[str, list[float]] = {name: [] for name in runners}
    vectors: dict[str, np.ndarray] = {}
    load_before = os.getloadavg()
    for trial in range(args.trials):
        for name, fn in runners.items():
            elapsed, vectors[name] = timed(fn)
            seconds[name].append(elapsed)
            print(f"trial {trial + 1}/{args.trials} {name}: {len(texts) / elapsed:.2f} docs/s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    docs_per_s = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    best_st = max((n for n in runners if n.startswith("sentence")), key=docs_per_s.get)
    st_vectors = vectors[best_st]
    result = {
        "model": args.model,
        "backend": ours.backend,
        "texts": len(texts),
        "mean_tokens": float(np.mean(lengths)),
        "share_at_max_length": float(np.mean(np.asarray(lengths) == MAX_LENGTH)),
        "max_length": MAX_LENGTH,
        "trials": args.trials,
        "torch_threads": torch.get_num_threads(),
        "docs_per_s": {k: round(v, 3) for k, v in docs_per_s.items()},
        "seconds_per_trial": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "reference": best_st,
        "ratio": round(docs_per_s["retroflow"] / docs_per_s[best_st], 3),
        "ratio_per_trial": [round(s_ref / s_ours, 3) for s_ref, s_ours in zip(seconds[best_st], seconds["retroflow"])],
        "max_deviation_1_minus_cos": max_cosine_deviation(vectors["retroflow"], st_vectors),
        "max_abs_diff": float(np.abs(vectors["retroflow"] - st_vectors).max()),
        "target": {"ratio": 1.3, "max_deviation": 1e-4},
        "loadavg_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    result["meets_target"] = result["ratio"] >= 1.3 and result["max_deviation_1_minus_cos"] <= 1e-4
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
