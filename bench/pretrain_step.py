"""Cost of one RetroMAE training step vs one plain MLM step of the same encoder and batch.

Measured in one process, interleaved round by round (so machine load hits all variants alike):
  retromae_enhanced  encoder MLM (masked rows only) + 1-layer enhanced decoder (all tokens)
  retromae_basic     encoder MLM + 1-layer basic decoder (masked rows only)
  mlm_masked_only    the same encoder and efficient masked-only MLM head, no decoder (honest baseline)
  hf_bert_mlm        vanilla HF BertForMaskedLM(labels=...) step: MLM head over all B x L positions
A step = forward + backward + AdamW update; collation is timed separately.

    python bench/pretrain_step.py [--model minilm] [--batch 16] [--length 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retromae.collator import RetroMAECollator, SpecialIds  # noqa: E402
from retromae.data import read_texts  # noqa: E402
from retromae.model import RetroMAEModel, load_pretrained_mlm, resolve_checkpoint, scratch_mlm  # noqa: E402
from retromae.testing import SCIFACT  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="checkpoint (alias or dir); its tokenizer is always used")
    parser.add_argument("--preset", choices=["tiny", "small", "base"], help="random-init encoder of this size instead of the checkpoint's weights")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
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
    features = make_features(tokenizer, args.batch, args.length)
    special = SpecialIds.from_tokenizer(tokenizer)
    collators = {d: RetroMAECollator(special, args.length, decoding=d) for d in ("enhanced", "basic")}
    collate_s = {}
    batches = {}
    for decoding, collator in collators.items():
        start = time.perf_counter()
        batches[decoding] = collator(features)
        collate_s[decoding] = time.perf_counter() - start

    variants = {
        "retromae_enhanced": step_fn(RetroMAEModel(mlm, "retromae", "enhanced").train(), batches["enhanced"], lambda m, b: m(**b).loss),
        "retromae_basic": step_fn(RetroMAEModel(mlm, "retromae", "basic").train(), batches["basic"], lambda m, b: m(**b).loss),
        "mlm_masked_only": step_fn(RetroMAEModel(mlm, "mlm").train(), batches["enhanced"], lambda m, b: m(**b).loss),
        "hf_bert_mlm": step_fn(
            mlm.train(), batches["enhanced"],
            lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss,
        ),
    }
    for run in variants.values():  # warm-up: allocator, oneDNN kernels
        run()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            times[name].append(run())
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "model": args.model,
        "preset": args.preset,
        "batch": args.batch,
        "length": args.length,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "step_s_median": {k: round(v, 4) for k, v in median.items()},
        "step_s_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "collate_s": {k: round(v, 4) for k, v in collate_s.items()},
        "ratio_enhanced_vs_mlm_masked_only": round(median["retromae_enhanced"] / median["mlm_masked_only"], 3),
        "ratio_basic_vs_mlm_masked_only": round(median["retromae_basic"] / median["mlm_masked_only"], 3),
        "ratio_enhanced_vs_hf_bert_mlm": round(median["retromae_enhanced"] / median["hf_bert_mlm"], 3),
        "ratio_mlm_masked_only_vs_hf_bert_mlm": round(median["mlm_masked_only"] / median["hf_bert_mlm"], 3),
        "target_ratio": 1.3,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, value in median.items():
        print(f"{name:20s} {value:7.3f} s/step")
    print(f"RetroMAE (enhanced) / plain masked-only MLM: {result['ratio_enhanced_vs_mlm_masked_only']:.2f}x "
          f"(basic {result['ratio_basic_vs_mlm_masked_only']:.2f}x); vs vanilla HF BertForMaskedLM: "
          f"{result['ratio_enhanced_vs_hf_bert_mlm']:.2f}x (target <= 1.3)", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
