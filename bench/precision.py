"""fp32 vs bf16 on this CPU: encoding against sentence-transformers, and a training step of each kind.

    python bench/precision.py [--docs 256] [--trials 3] [--steps 3] [--ndcg] [--out bench/results/precision.json]

Encoding (same model, the same seeded sample of SciFact passages, max length 256, one process,
variants interleaved per trial, median docs/s over trials):
- `st_fp32`: sentence-transformers' `encode` as it comes (fp32, batch 32): the reference default;
- `st_bf16`: the same under `torch.autocast("cpu", bfloat16)`, and `st_bf16_b16` at batch 16 (its
  best CPU settings here: its ONNX backend needs `optimum`, which does not install beside the
  pinned stack, see bench/README.md);
- `retroflow_fp32`: retroflow's encoder, `precision: fp32` (the fused backend);
- `retroflow_bf16`: retroflow's encoder, `precision: auto` (= bf16 where the CPU has it; the fused
  backend in bf16);
- `retroflow_bf16_hf`: the same with `backend: hf` (transformers' forward under autocast), to show
  what the fused backend adds in bf16.
Ratios: retroflow bf16 against the best sentence-transformers variant and against `st_fp32`.
`--ndcg` adds SciFact test nDCG@10 of retroflow fp32 and bf16 (two full corpus encodings).

Training steps (forward + backward + AdamW, median over `--steps` timed steps after one warm-up,
fp32 and bf16 interleaved): a RetroMAE enhanced-decoding step and a masked-only MLM step on MiniLM
(16 x 128), and a fine-tuning step (the distillation recipe's shape: 16 queries x 8 passages of
128 tokens, mean pooling).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.encode import MAX_LENGTH, max_cosine_deviation, read_passages  # noqa: E402
from retroflow.publish import atomic_write_text  # noqa: E402


def git_head() -> str | None:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return found.stdout.strip() or None


def bf16_autocast(on: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if on else nullcontext()


def encoding(texts: list[str], trials: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from retrieval.serving.encoder import Encoder, EncoderSettings
    from retroflow.models import resolve_model_path

    st = SentenceTransformer(str(resolve_model_path("minilm")), device="cpu")
    st.max_seq_length = MAX_LENGTH
    settings = dict(show_progress=False, passage_max_length=MAX_LENGTH)
    ours = {
        "fp32": Encoder("minilm", EncoderSettings(**settings, precision="fp32")),
        "auto": Encoder("minilm", EncoderSettings(**settings, precision="auto")),
        "auto_hf": Encoder("minilm", EncoderSettings(**settings, precision="auto", backend="hf")),
    }

    def st_encode(bf16: bool, batch_size: int = 32):
        with bf16_autocast(bf16):
            return st.encode(texts, batch_size=batch_size, convert_to_numpy=True)

    runners = {
        "st_fp32": lambda: st_encode(False),
        "st_bf16": lambda: st_encode(True),
        "st_bf16_b16": lambda: st_encode(True, 16),
        "retroflow_fp32": lambda: ours["fp32"].encode_passages(texts),
        "retroflow_bf16": lambda: ours["auto"].encode_passages(texts),
        "retroflow_bf16_hf": lambda: ours["auto_hf"].encode_passages(texts),
    }
    for fn in runners.values():  # warm-up: first-call allocations, oneDNN kernel selection
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    vectors = {}
    for trial in range(trials):
        for name, fn in runners.items():
            start = time.perf_counter()
            vectors[name] = fn()
            seconds[name].append(time.perf_counter() - start)
            print(f"trial {trial + 1}/{trials} {name}: {len(texts) / seconds[name][-1]:.1f} docs/s", file=sys.stderr, flush=True)
    docs_per_s = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    best_st = max(("st_fp32", "st_bf16", "st_bf16_b16"), key=docs_per_s.get)
    return {
        "texts": len(texts),
        "max_length": MAX_LENGTH,
        "trials": trials,
        "retroflow_backends": {p: e.backend for p, e in ours.items()},
        "docs_per_s": {k: round(v, 2) for k, v in docs_per_s.items()},
        "seconds_per_trial": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "best_sentence_transformers": best_st,
        "ratio_bf16_vs_best_st": round(docs_per_s["retroflow_bf16"] / docs_per_s[best_st], 3),
        "ratio_bf16_vs_st_fp32": round(docs_per_s["retroflow_bf16"] / docs_per_s["st_fp32"], 3),
        "ratio_retroflow_bf16_vs_fp32": round(docs_per_s["retroflow_bf16"] / docs_per_s["retroflow_fp32"], 3),
        "ratio_fused_vs_hf_bf16": round(docs_per_s["retroflow_bf16"] / docs_per_s["retroflow_bf16_hf"], 3),
        "ratio_hf_bf16_vs_best_st": round(docs_per_s["retroflow_bf16_hf"] / docs_per_s[best_st], 3),
        "max_1_minus_cos_bf16_vs_st_fp32": max_cosine_deviation(vectors["retroflow_bf16"], vectors["st_fp32"]),
        "max_1_minus_cos_fp32_vs_st_fp32": max_cosine_deviation(vectors["retroflow_fp32"], vectors["st_fp32"]),
        "max_1_minus_cos_hf_bf16_vs_st_fp32": max_cosine_deviation(vectors["retroflow_bf16_hf"], vectors["st_fp32"]),
        "max_1_minus_cos_st_bf16_vs_st_fp32": max_cosine_deviation(vectors["st_bf16"], vectors["st_fp32"]),
    }


def scifact_ndcg(dataset_dir: Path) -> dict:
    from eval.evaluate import EvaluateConfig, Target, evaluate
    from retroflow.data.beir import load_dataset

    dataset = load_dataset(dataset_dir)
    out = {}
    for precision in ("fp32", "auto"):
        config = EvaluateConfig(
            metrics=["ndcg@10"], encoder={"precision": precision, "passage_max_length": MAX_LENGTH, "show_progress": False}
        )
        result = evaluate(config, Target(model="minilm", dataset=str(dataset_dir)), dataset)
        out["retroflow_" + ("bf16" if precision == "auto" else "fp32")] = round(result["ndcg@10"], 4)
    out["delta_bf16_minus_fp32"] = round(out["retroflow_bf16"] - out["retroflow_fp32"], 4)
    return out


def step_timer(model, optimizer, loss_fn, bf16: bool):
    def run() -> float:
        start = time.perf_counter()
        with bf16_autocast(bf16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return run


def training_steps(steps: int) -> dict:
    """Median step seconds, fp32 and bf16 interleaved, for a RetroMAE, an MLM and a fine-tuning step."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from retrieval.training.finetune import pool_hidden
    from retroflow.models import resolve_model_path
    from retromae.collator import RetroMAECollator, SpecialIds
    from retromae.model import load_retromae

    path = resolve_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = read_passages(REPO.parent / "shared" / "data" / "scifact" / "corpus.jsonl", 144, seed=1)
    ids = [x[1:-1][:126] for x in tokenizer(texts)["input_ids"]]
    torch.manual_seed(0)
    variants = {}
    for objective in ("retromae", "mlm"):
        model = load_retromae(path, objective, "enhanced", 1).train()
        collator = RetroMAECollator(
            special=SpecialIds.from_tokenizer(tokenizer),
            max_length=128,
            encoder_mask_ratio=0.3,
            decoder_mask_ratio=0.5,
            objective=objective,
            decoding="enhanced",
            seed=0,
        )
        batch = collator([{"input_ids": x, "mask_key": i} for i, x in enumerate(ids[:16])])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for bf16 in (False, True):
            variants[f"{objective}_{'bf16' if bf16 else 'fp32'}"] = step_timer(model, optimizer, lambda m=model, b=batch: m(**b).loss, bf16)
    encoder = AutoModel.from_pretrained(path).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
    queries = tokenizer(texts[:16], truncation=True, max_length=64, padding=True, return_tensors="pt")
    passages = tokenizer(texts[16:144], truncation=True, max_length=128, padding=True, return_tensors="pt")

    def finetune_loss():
        q = torch.nn.functional.normalize(
            pool_hidden(encoder(**queries).last_hidden_state.float(), queries["attention_mask"], "mean"), dim=-1
        )
        p = torch.nn.functional.normalize(
            pool_hidden(encoder(**passages).last_hidden_state.float(), passages["attention_mask"], "mean"), dim=-1
        )
        return torch.nn.functional.cross_entropy(q @ p.T / 0.05, torch.arange(16) * 8)

    for bf16 in (False, True):
        variants[f"finetune_{'bf16' if bf16 else 'fp32'}"] = step_timer(encoder, optimizer, finetune_loss, bf16)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for name, run in variants.items():  # warm-up
        run()
    for step in range(steps):
        for name, run in variants.items():
            seconds[name].append(run())
            print(f"step {step + 1}/{steps} {name}: {seconds[name][-1]:.2f} s", file=sys.stderr, flush=True)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "shape": {"pretrain": "16 x 128", "finetune": "16 queries x 64 + 128 passages x 128"},
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "speedup_bf16": {kind: round(median[f"{kind}_fp32"] / median[f"{kind}_bf16"], 3) for kind in ("retromae", "mlm", "finetune")},
        "retromae_over_mlm": {p: round(median[f"retromae_{p}"] / median[f"mlm_{p}"], 3) for p in ("fp32", "bf16")},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ndcg", action="store_true", help="also SciFact test nDCG@10 of retroflow fp32 and bf16 (two corpus encodings)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "precision.json")
    args = parser.parse_args(argv)

    import torch

    from retroflow.devices import cpu_has_native_bf16

    data = REPO.parent / "shared" / "data" / "scifact"
    load_before = os.getloadavg()
    result = {
        "command": "python bench/precision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git_head(),
        "native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "encoding": encoding(read_passages(data / "corpus.jsonl", args.docs, seed=0), args.trials),
    }
    if not args.skip_training:
        result["training"] = training_steps(args.steps)
    if args.ndcg:
        result["scifact_test_ndcg@10"] = scifact_ndcg(data)
    result["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    result["targets"] = {"encode_vs_best_st": 1.3, "encode_vs_st_fp32": 2.0, "ndcg_delta": 0.002, "training_speedup": 1.4}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
