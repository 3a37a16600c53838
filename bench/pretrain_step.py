"""Cost of one RetroMAE training step vs one plain MLM step of the same encoder and batch.

Measured in one process, interleaved round by round (so machine load hits all variants alike):
  retromae_enhanced  encoder MLM (masked rows only) + 1-layer enhanced decoder (all tokens)
  retromae_basic     encoder MLM + 1-layer basic decoder (masked rows only)
  mlm_masked_only    the same encoder and efficient masked-only MLM head, no decoder (honest baseline)
  hf_bert_mlm        vanilla HF BertForMaskedLM(labels=...) step: MLM head over all B x L positions
  enhanced_ce_chunk  retromae_enhanced with `ce_chunk_size` (chunked, recomputed vocabulary CE)
  enhanced_frac0.5   retromae_enhanced with `decoder_target_fraction` 0.5 (and 0.25)
A step = forward + backward + AdamW update. Collation is timed separately (median of
--collate-repeats) on --collate-batch samples (default: the step batch; the paper's 32 x 512
micro-batch can be timed while the steps run a CPU-sized batch) and reported per micro-batch and
as a share of the step it feeds (per-sample collation time x step batch / step time).

    python bench/pretrain_step.py [--model minilm] [--preset base] [--batch 16] [--length 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
sys.path.insert(0, str(REPO))

from retromae.collator import RetroMAECollator, SpecialIds  # noqa: E402
from retromae.data import read_texts  # noqa: E402
from retromae.model import RetroMAEModel, load_pretrained_mlm, resolve_checkpoint, scratch_mlm  # noqa: E402

FRACTIONS = (0.5, 0.25)


def make_features(tokenizer, batch: int, length: int) -> list[dict]:
    """Real SciFact text cut to exactly length-2 tokens (fixed shape), random ids if it is absent."""
    body = length - 2
    if SCIFACT.is_file():
        rows = []
        for text in read_texts([SCIFACT], 400):
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= body:
                rows.append(ids[:body])
            if len(rows) == batch:
                return [{"input_ids": r, "mask_key": i} for i, r in enumerate(rows)]
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1000, len(tokenizer), (body,), generator=g).tolist(), "mask_key": i} for i in range(batch)]


def step_fn(module, batch, loss_of):
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

    def run() -> float:
        start = time.perf_counter()
        loss = loss_of(module, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return run


def collate_seconds(collator: RetroMAECollator, features: list[dict], repeats: int) -> float:
    """Median seconds to build one micro-batch of `features`."""
    seconds = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        collator(features)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def collators(special: SpecialIds, length: int) -> dict[str, RetroMAECollator]:
    """One collator per batch kind the variants need."""
    out = {d: RetroMAECollator(special, length, decoding=d) for d in ("enhanced", "basic")}
    out.update({f"frac{f}": RetroMAECollator(special, length, decoder_target_fraction=f) for f in FRACTIONS})
    return out


def loss_of_model(m, b):
    return m(**b).loss


def hf_loss(m, b):
    return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss


def make_variants(mlm, batches: dict[str, dict], ce_chunk: int) -> dict:
    """All variants share one encoder (same weights, same batch content): only the head/decoder differ."""
    enhanced = RetroMAEModel(mlm, "retromae", "enhanced").train()
    variants = {
        "retromae_enhanced": step_fn(enhanced, batches["enhanced"], loss_of_model),
        "retromae_basic": step_fn(RetroMAEModel(mlm, "retromae", "basic").train(), batches["basic"], loss_of_model),
        "mlm_masked_only": step_fn(RetroMAEModel(mlm, "mlm").train(), batches["enhanced"], loss_of_model),
        "hf_bert_mlm": step_fn(mlm.train(), batches["enhanced"], hf_loss),
        "enhanced_ce_chunk": step_fn(
            RetroMAEModel(mlm, "retromae", "enhanced", ce_chunk_size=ce_chunk).train(), batches["enhanced"], loss_of_model
        ),
    }
    for f in FRACTIONS:
        variants[f"enhanced_frac{f}"] = step_fn(enhanced, batches[f"frac{f}"], loss_of_model)
    return variants


def measure(variants: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):  # allocator, oneDNN kernels
        for run in variants.values():
            run()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            times[name].append(run())
    return times


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="checkpoint (alias or dir); its tokenizer is always used")
    parser.add_argument(
        "--preset", choices=["tiny", "small", "base"], help="random-init encoder of this size instead of the checkpoint's weights"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (0 for very slow shapes)")
    parser.add_argument("--ce-chunk", type=int, default=1024, help="ce_chunk_size of the enhanced_ce_chunk variant")
    parser.add_argument("--collate-repeats", type=int, default=3)
    parser.add_argument("--collate-batch", type=int, default=None, help="micro-batch size for the collation timing (default --batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pretrain_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    path = resolve_checkpoint(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.preset:  # same vocabulary, different width/depth: how the ratio scales with encoder size
        mlm = scratch_mlm(args.preset, len(tokenizer), tokenizer.pad_token_id, args.length, dropout=0.0)
    else:
        mlm = load_pretrained_mlm(path, dropout=0.0)  # dropout off: identical work every round
    collate_batch = args.collate_batch or args.batch
    features = make_features(tokenizer, max(args.batch, collate_batch), args.length)
    batches, collate_s = {}, {}
    for kind, collator in collators(SpecialIds.from_tokenizer(tokenizer), args.length).items():
        batches[kind] = collator(features[: args.batch])
        collate_s[kind] = collate_seconds(collator, features[:collate_batch], args.collate_repeats)
    per_step = args.batch / collate_batch  # collation scales with the number of samples

    times = measure(make_variants(mlm, batches, args.ce_chunk), args.rounds, args.warmup)
    median = {name: statistics.median(t) for name, t in times.items()}
    baseline = median["mlm_masked_only"]
    result = {
        "model": args.model,
        "preset": args.preset,
        "batch": args.batch,
        "length": args.length,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "ce_chunk_size": args.ce_chunk,
        "threads": torch.get_num_threads(),
        "step_s_median": {k: round(v, 4) for k, v in median.items()},
        "step_s_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "collate_batch": collate_batch,
        "collate_s": {k: round(v, 4) for k, v in collate_s.items()},
        # collation on the critical path (no loader workers, as on CPU hosts): its share of the step
        "collate_share_of_step": {
            "enhanced": round(collate_s["enhanced"] * per_step / median["retromae_enhanced"], 4),
            "basic": round(collate_s["basic"] * per_step / median["retromae_basic"], 4),
        },
        "ratio_vs_mlm_masked_only": {k: round(v / baseline, 3) for k, v in median.items()},
        "ratio_enhanced_vs_mlm_masked_only": round(median["retromae_enhanced"] / baseline, 3),
        "ratio_basic_vs_mlm_masked_only": round(median["retromae_basic"] / baseline, 3),
        "ratio_enhanced_vs_hf_bert_mlm": round(median["retromae_enhanced"] / median["hf_bert_mlm"], 3),
        "ratio_mlm_masked_only_vs_hf_bert_mlm": round(baseline / median["hf_bert_mlm"], 3),
        "target_ratio": 1.3,
        "commit": git_head(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, value in median.items():
        print(f"{name:20s} {value:7.3f} s/step  {value / baseline:5.2f}x mlm_masked_only")
    print(
        f"collation per {collate_batch} x {args.length} micro-batch: enhanced {collate_s['enhanced']:.3f} s "
        f"({100 * result['collate_share_of_step']['enhanced']:.1f}% of its step), basic {collate_s['basic']:.3f} s",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
