"""GPU check in one short run (< 8 minutes on one GPU); prints one JSON line.

Parts, each reported as {"status": "ok" | "skipped" | "failed", ...}:
  pretrain  a few hundred steps of configs/pretrain/bert-base-paper.yaml at its real per-GPU batch
            shape (global batch / 8 GPUs = 32 x 512), bf16, through PretrainTrainer: step time,
            collation share of the step, peak memory; then short runs of the cost options
            (ce_chunk_size, decoder_target_fraction) for their step time and peak memory
  dpr_step  DPR fine-tuning steps of configs/finetune/msmarco-paper.yaml (per-GPU share of its
            batch, 15 hard negatives) on the encoder the pretrain part produced
  encode    retrieval.serving.encoder.Encoder passage-encoding throughput of that encoder
  faiss     a flat inner-product index of random vectors built on CPU and copied to the GPU with
            the library's `to_gpu`, searched on both; the GPU's top-k must match the CPU's

Without CUDA every part is skipped with its reason and the exit status is 0. `--cpu-smoke` runs
every part on CPU at toy sizes instead: a check of this script, not of the GPU. Exit 1 when a
part failed. Text is synthetic (random words of a generated vocabulary): no data set needed.

    bash scripts/gpu_check.sh [--steps 200] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retroflow.config import load_config  # noqa: E402
from retromae.config import PretrainConfig  # noqa: E402

PRETRAIN_CONFIG = REPO / "configs" / "pretrain" / "bert-base-paper.yaml"
FINETUNE_CONFIG = REPO / "configs" / "finetune" / "msmarco-paper.yaml"
PAPER_GPUS = 8  # both configs' global batches are written for 8 GPUs; one GPU runs one share
PARTS = ("pretrain", "dpr_step", "encode", "faiss")
COST_OPTIONS = {"ce_chunk_size=4096": ["ce_chunk_size=4096"], "decoder_target_fraction=0.25": ["decoder_target_fraction=0.25"]}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Sizes:
    pretrain_steps: int
    option_steps: int
    pretrain_batch: int
    length: int
    preset_override: str | None  # None: the config's own preset
    dpr_steps: int
    dpr_batch: int
    encode_docs: int
    index_vectors: int
    index_queries: int


def gpu_sizes(steps: int) -> Sizes:
    pretrain = load_config(PretrainConfig, PRETRAIN_CONFIG)
    return Sizes(
        pretrain_steps=steps,
        option_steps=max(steps // 5, 20),
        pretrain_batch=pretrain.train.batch_size // PAPER_GPUS,
        length=pretrain.data.max_seq_length,
        preset_override=None,
        dpr_steps=10,
        dpr_batch=finetune_config().train.batch_size // PAPER_GPUS,
        encode_docs=20_000,
        index_vectors=200_000,
        index_queries=1_000,
    )


CPU_SMOKE = Sizes(
    pretrain_steps=3,
    option_steps=2,
    pretrain_batch=2,
    length=64,
    preset_override="tiny",
    dpr_steps=2,
    dpr_batch=2,
    encode_docs=16,
    index_vectors=1_000,
    index_queries=4,
)


def finetune_config(overrides: list[str] | None = None):
    from retrieval.training.finetune import FinetuneConfig

    return load_config(FinetuneConfig, FINETUNE_CONFIG, overrides)


# --------------------------------------------------------------------------- helpers


def skipped(reason: str, **extra) -> dict:
    return {"status": "skipped", "reason": reason, **extra}


def run_part(fn: Callable[[], dict]) -> dict:
    """A failing part is reported (and fails the exit status), it does not stop the others."""
    started = time.perf_counter()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - reported in the JSON line, traceback on stderr
        traceback.print_exc()
        out = {"status": "failed", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
    out.setdefault("status", "ok")
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def median_interval(stamps: list[float], skip: int) -> float | None:
    """Median seconds between consecutive stamps, after `skip` warm-up intervals."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][skip:]
    return statistics.median(gaps) if gaps else None


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def synthetic_tokenizer(vocab_size: int):
    """A WordPiece tokenizer over SPECIALS + words w5..w{vocab-1}: the config's vocabulary size, no corpus."""
    from transformers import BertTokenizer

    tokens = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), vocab_size)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})


def random_texts(count: int, words: int, vocab_size: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), vocab_size, (count, words), generator=g).tolist()
    return [" ".join(f"w{i}" for i in row) for row in ids]


# --------------------------------------------------------------------------- pretrain


def pretrain_run(overrides: list[str], steps: int, sizes: Sizes, device: torch.device, work: Path, tokenizer) -> tuple[dict, object]:
    """`steps` optimizer steps of the paper config through PretrainTrainer; (figures, trained model)."""
    from datasets import Dataset

    from retroflow.devices import seed_everything
    from retroflow.training import TrainingHook, make_accelerator
    from retromae.pretrain import build_collator, build_model
    from retromae.trainer import PretrainTrainer

    class StepClock(TrainingHook):
        def __init__(self):
            self.stamps: list[float] = []

        def on_step_end(self, loop, losses):
            self.stamps.append(time.perf_counter())

    precision = "bf16" if device.type == "cuda" else "fp32"
    shape = [
        f"train.batch_size={sizes.pretrain_batch}",
        "train.grad_accum_steps=1",
        f"train.max_steps={steps}",
        f"train.save_every={steps}",
        f"train.log_every={steps}",
        f"train.precision={precision}",
        f"train.device={device.type}",
        f"data.max_seq_length={sizes.length}",
    ]
    if sizes.preset_override:
        shape.append(f"model.preset={sizes.preset_override}")
    cfg = load_config(PretrainConfig, PRETRAIN_CONFIG, shape + overrides)
    seed_everything(cfg.train.seed)
    model, collator = build_model(cfg, tokenizer), build_collator(cfg, tokenizer)
    # cost options set here too, in case retromae.pretrain does not pass them on (setting them twice is harmless)
    model.ce_chunk_size, collator.decoder_target_fraction = cfg.ce_chunk_size, cfg.decoder_target_fraction
    rows = torch.randint(len(SPECIALS), len(tokenizer), (steps * sizes.pretrain_batch, sizes.length - 2)).tolist()
    dataset = Dataset.from_dict({"input_ids": rows})  # full-length rows: the real batch shape every step
    reset_peak(device)
    trainer = PretrainTrainer(make_accelerator(cfg.train), model, dataset, collator, cfg.train, work / "checkpoints")
    clock = StepClock()
    state = trainer.train(resume=False, hooks=[clock])
    stamps = clock.stamps
    step_s = median_interval(stamps, skip=min(5, max(len(stamps) - 2, 0)))
    micro_batch = [{"input_ids": r, "mask_key": i} for i, r in enumerate(rows[: sizes.pretrain_batch])]
    collate_s = statistics.median(timed(lambda: collator(micro_batch), 3))
    figures = {
        "steps": state.global_step,
        "batch": [sizes.pretrain_batch, sizes.length],
        "precision": precision,
        "step_s_median": round(step_s, 4) if step_s else None,
        "collate_s_per_micro_batch": round(collate_s, 4),
        "collation_share_of_step": round(collate_s / step_s, 4) if step_s else None,
        "peak_memory_gib": peak_gib(device),
        "loss_first_last": [round(state.history()[0], 3), round(state.history()[-1], 3)],
    }
    return figures, trainer.acc.unwrap_model(trainer.model)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def pretrain_part(sizes: Sizes, device: torch.device, work: Path, encoder_out: Path) -> dict:
    vocab_size = load_config(PretrainConfig, PRETRAIN_CONFIG).model.vocab_size
    tokenizer = synthetic_tokenizer(vocab_size)
    figures, model = pretrain_run([], sizes.pretrain_steps, sizes, device, work / "paper", tokenizer)
    model.save(encoder_out, tokenizer)  # the encoder the other parts use
    del model
    options = {}
    for name, overrides in COST_OPTIONS.items():
        options[name], _ = pretrain_run(overrides, sizes.option_steps, sizes, device, work / name, tokenizer)
    return {**figures, "cost_options": options}


# --------------------------------------------------------------------------- DPR, encoding, FAISS


def dpr_part(sizes: Sizes, device: torch.device, work: Path, encoder_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from retrieval.training.finetune import FinetuneTrainer
    from retrieval.training.training_data import TrainingExample, TrainingSet

    cfg = finetune_config(
        [
            f"train.batch_size={sizes.dpr_batch}",
            f"train.max_steps={sizes.dpr_steps}",
            f"train.device={device.type}",
            f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}",
        ]
    )
    negatives = cfg.negatives.hard_negatives
    queries = sizes.dpr_batch * sizes.dpr_steps
    vocab = len(AutoTokenizer.from_pretrained(encoder_dir))
    texts = random_texts(queries * (2 + negatives), cfg.model.passage_max_length, vocab, seed=1)
    examples, passages, pools = [], {}, {}
    for q in range(queries):
        base = q * (2 + negatives)
        passages.update({f"d{base + i}": texts[base + i] for i in range(1, 2 + negatives)})
        examples.append(TrainingExample(f"q{q}", texts[base][: cfg.model.query_max_length * 4], (f"d{base + 1}",)))
        pools[f"q{q}"] = [f"d{base + i}" for i in range(2, 2 + negatives)]
    train = TrainingSet(examples, passages, {e.qid: set(e.positives) for e in examples})
    reset_peak(device)
    trainer = FinetuneTrainer(cfg, encoder_dir, train, work / "dpr")
    trainer.set_pools(pools)
    seconds = []
    for step in range(sizes.dpr_steps):
        start = time.perf_counter()
        trainer.train_step(step, trainer.plan.global_batch(step, trainer.pools))
        seconds.append(time.perf_counter() - start)
    return {
        "steps": sizes.dpr_steps,
        "queries_per_step": sizes.dpr_batch,
        "passages_per_query": 1 + negatives,
        "lengths_query_passage": [cfg.model.query_max_length, cfg.model.passage_max_length],
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "step_s_median": round(statistics.median(seconds[1:] or seconds), 4),
        "peak_memory_gib": peak_gib(device),
    }


def encode_part(sizes: Sizes, device: torch.device, encoder_dir: Path) -> dict:
    from retrieval.serving.encoder import Encoder, EncoderSettings

    encoder = Encoder(encoder_dir, EncoderSettings(show_progress=False, device=device.type, passage_max_length=256))
    texts = random_texts(sizes.encode_docs, 200, len(encoder.tokenizer), seed=2)  # ~200 tokens, like a passage
    encoder.encode_passages(texts[:64])  # warm-up: kernels, allocator
    encoder.encode_passages(texts)
    return {
        "docs": len(texts),
        "max_length": 256,
        "backend": encoder.backend,
        "dtype": str(encoder.dtype).replace("torch.", ""),
        "docs_per_s": round(encoder.last_docs_per_s or 0, 1),
    }


def faiss_part(sizes: Sizes) -> dict:
    import faiss
    import numpy as np

    from retrieval.serving.index import gpu_count, to_gpu

    if gpu_count() == 0:
        return skipped("faiss sees no GPU (faiss-cpu build or no visible device)")
    # random, not encoded, vectors: this checks faiss on the GPU, and a briefly trained encoder's
    # near-identical embeddings would make the top hits ties
    vectors = np.random.default_rng(3).standard_normal((sizes.index_vectors, 768)).astype(np.float32)
    queries = vectors[: sizes.index_queries] + 0.01  # near-duplicates of stored vectors: unambiguous top hits
    cpu = faiss.IndexFlatIP(vectors.shape[1])
    cpu.add(vectors)
    _, expected = cpu.search(queries, 10)
    start = time.perf_counter()
    gpu, on_gpu = to_gpu(cpu, "always")
    copy_s = time.perf_counter() - start
    start = time.perf_counter()
    _, got = gpu.search(queries, 10)
    search_s = time.perf_counter() - start
    top1 = float((got[:, 0] == expected[:, 0]).mean())
    overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, expected)]))
    ok = on_gpu and top1 == 1.0 and overlap >= 0.95  # fp16 storage on GPU may reorder near-ties lower down
    return {
        "status": "ok" if ok else "failed",
        "vectors": list(vectors.shape),
        "to_gpu_s": round(copy_s, 3),
        "gpu_search_s": round(search_s, 4),
        "top1_agreement": top1,
        "top10_overlap": round(overlap, 4),
    }


# --------------------------------------------------------------------------- main


def all_skipped(reason: str) -> dict:
    shape = gpu_sizes(0)
    notes = {"pretrain": {"batch": [shape.pretrain_batch, shape.length]}, "dpr_step": {"queries_per_step": shape.dpr_batch}}
    return {part: skipped(reason, **notes.get(part, {})) for part in PARTS}


def run_all(sizes: Sizes, device: torch.device) -> dict:
    parts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        encoder_dir = work / "pretrained"
        parts["pretrain"] = run_part(lambda: pretrain_part(sizes, device, work, encoder_dir))
        have_encoder = (encoder_dir / "encoder" / "config.json").is_file()
        needs = skipped("needs the encoder of the pretrain part, which failed")
        parts["dpr_step"] = run_part(lambda: dpr_part(sizes, device, work, encoder_dir / "encoder")) if have_encoder else needs
        parts["encode"] = run_part(lambda: encode_part(sizes, device, encoder_dir / "encoder")) if have_encoder else needs
        parts["faiss"] = run_part(lambda: faiss_part(sizes))
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps of the paper config")
    parser.add_argument("--cpu-smoke", action="store_true", help="run every part on CPU at toy sizes (tests this script)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    if args.cpu_smoke:
        device, parts = torch.device("cpu"), run_all(CPU_SMOKE, torch.device("cpu"))
    elif not cuda:
        device, parts = torch.device("cpu"), all_skipped("CUDA is not available on this machine")
    else:
        device = torch.device("cuda")
        parts = run_all(gpu_sizes(args.steps), device)
    report = {
        "check": "gpu_check",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": cuda,
        "cpu_smoke": args.cpu_smoke,
        "torch": torch.__version__,
        "parts": parts,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report), flush=True)
    return 1 if any(p["status"] == "failed" for p in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
