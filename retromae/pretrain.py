"""The pretrain stage: config -> data -> model -> trainer -> encoder/ + decoder/ + loss_history.json."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from retroflow.devices import seed_everything
from retroflow.inputs import Input
from retroflow.publish import atomic_write_text
from retroflow.training import make_accelerator
from retromae.collator import RetroMAECollator, SpecialIds, continuation_table
from retromae.config import PretrainConfig
from retromae.data import load_pretraining_chunks, read_texts, train_wordpiece
from retromae.model import ENCODER_DIR, RetroMAEModel, describe, load_retromae, resolve_checkpoint, scratch_mlm
from retromae.trainer import HeldOutLoss, PretrainTrainer

log = logging.getLogger("retroflow.retromae")

TOKENIZER_DIR = "tokenizer"


def load_tokenizer(config: PretrainConfig, texts: list[str], partial_dir: Path, accelerator):
    """The run's tokenizer; one trained from scratch is kept in partial_dir so a resume reuses it."""
    from transformers import AutoTokenizer

    if config.model.init is not None:
        path = resolve_checkpoint(config.model.init)
        return AutoTokenizer.from_pretrained(path / "encoder" if (path / "encoder").is_dir() else path)
    if config.model.tokenizer is not None:
        name = config.model.tokenizer  # a tokenizer-only directory has no config.json: load it as is
        return AutoTokenizer.from_pretrained(name if Path(name).is_dir() else resolve_checkpoint(name))
    saved = partial_dir / TOKENIZER_DIR
    with accelerator.main_process_first():
        if not (saved / "tokenizer_config.json").is_file():
            train_wordpiece(texts, config.model.vocab_size).save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


def needs_tokenizer(config: PretrainConfig) -> bool:
    """From scratch without a given tokenizer: a WordPiece vocabulary must be trained first."""
    return config.model.init is None and config.model.tokenizer is None


def _train_tokenizer(config: PretrainConfig, out_dir: Path, text_files: list[Path] | None = None) -> dict:
    """Train the from-scratch run's WordPiece tokenizer on its pretraining text into out_dir."""
    sources = [Path(p) for p in text_files] if text_files else config.data_sources()
    texts = read_texts(sources, config.data.max_docs)
    tokenizer = train_wordpiece(texts, config.model.vocab_size)
    tokenizer.save_pretrained(out_dir)
    return {"vocab_size": len(tokenizer), "documents": len(texts)}


def tokenizer_config(config: PretrainConfig) -> PretrainConfig:
    """What the tokenizer depends on: the text and the vocabulary size, not the training settings."""
    defaults = PretrainConfig()
    return defaults.with_overrides(
        model={"init": None, "vocab_size": config.model.vocab_size},
        data={"beir_corpus": config.data.beir_corpus, "files": list(config.data.files), "max_docs": config.data.max_docs},
    )


def scratch_config(config: PretrainConfig) -> PretrainConfig:
    """What a from-scratch encoder's initial weights depend on: architecture, data shape and seed,
    not the objective (the `scratch` step's config, so every arm of a seed shares one)."""
    canonical = config.canonical()
    return PretrainConfig().with_overrides(model=canonical["model"], data=canonical["data"], train={"seed": config.train.seed})


def resolve_bottleneck(config: PretrainConfig) -> tuple[str, bool]:
    """(pooling the decoder reads, normalize to declare): `init` reads the init model's own
    sentence-transformers pooling; a saved encoder declares what it was trained with."""
    from retroflow.models import read_sentence_transformer_settings

    if config.bottleneck != "init":
        return config.bottleneck, False
    path = resolve_checkpoint(str(config.model.init))
    encoder_dir = path / ENCODER_DIR if (path / ENCODER_DIR).is_dir() else path
    st = read_sentence_transformer_settings(Path(encoder_dir))
    if st.pooling not in ("cls", "mean"):
        found = "no sentence-transformers pooling config" if st.pooling is None else f"pooling {st.pooling!r}"
        raise ValueError(
            f"bottleneck: init needs an init model that declares cls or mean pooling; {config.model.init} ({encoder_dir}) has {found}"
        )
    return st.pooling, bool(st.normalize)


def build_model(config: PretrainConfig, tokenizer) -> RetroMAEModel:
    m = config.model
    bottleneck, normalize = resolve_bottleneck(config)
    if m.init is not None:
        return load_retromae(
            resolve_checkpoint(m.init),
            config.objective,
            config.decoding,
            config.decoder_layers,
            m.dropout,
            ce_chunk_size=config.ce_chunk_size,
            bottleneck=bottleneck,
            normalize=normalize,
        )
    mlm = scratch_mlm(m.preset, len(tokenizer), tokenizer.pad_token_id, config.data.max_seq_length, m.dropout)
    log.info("from scratch: preset %s, vocab %d", m.preset, len(tokenizer))
    return RetroMAEModel(
        mlm,
        config.objective,
        config.decoding,
        config.decoder_layers,
        ce_chunk_size=config.ce_chunk_size,
        bottleneck=bottleneck,
        normalize=normalize,
    )


def split_heldout(dataset, config: PretrainConfig):
    """(training chunks, held-out chunks): `data.heldout_fraction` of the chunks (at most
    `data.heldout_max_chunks`), drawn with a fixed seed so every arm and seed holds out the same text."""
    want = min(int(round(config.data.heldout_fraction * len(dataset))), config.data.heldout_max_chunks)
    if want == 0:
        return dataset, None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    held = sorted(order[:want])
    kept = sorted(order[want:])
    return dataset.select(kept), dataset.select(held)


def build_collator(config: PretrainConfig, tokenizer) -> RetroMAECollator:
    return RetroMAECollator(
        special=SpecialIds.from_tokenizer(tokenizer),
        max_length=config.data.max_seq_length,
        encoder_mask_ratio=config.encoder_mask_ratio,
        decoder_mask_ratio=config.decoder_mask_ratio,
        objective=config.objective,
        decoding=config.decoding,
        continuation=continuation_table(tokenizer) if config.whole_word_mask else None,
        seed=config.train.seed,
        decoder_target_fraction=config.decoder_target_fraction,
    )


def _save_scratch_init(config: PretrainConfig, out_dir: Path) -> dict:
    """Save the from-scratch encoder exactly as `run` initialises it (same seed, same
    draw order), untrained: the `none` arm of an ablation, the floor every objective must beat."""
    from transformers import AutoTokenizer

    if config.model.init is not None or config.model.tokenizer is None:
        raise ValueError("a scratch init needs model.init null and a model.tokenizer directory")
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer)
    seed_everything(config.train.seed)
    model = build_model(config, tokenizer)
    model.save(Path(out_dir), tokenizer)
    return {"steps": 0, "objective": "none", "vocab_size": len(tokenizer)}


def _pretrain(
    config: PretrainConfig,
    out_dir: Path,
    partial_dir: Path,
    text_files: list[Path] | None,
    resume: bool,
    stop_after: int | None,
) -> dict:
    out_dir, partial_dir = Path(out_dir), Path(partial_dir)
    config.warn_outside_paper()
    accelerator = make_accelerator(config.train)
    seed_everything(config.train.seed)
    sources = [Path(p) for p in text_files] if text_files else config.data_sources()
    texts = read_texts(sources, config.data.max_docs)
    tokenizer = load_tokenizer(config, texts, partial_dir, accelerator)
    with accelerator.main_process_first():  # rank 0 tokenises, the others read its cache
        dataset = load_pretraining_chunks(sources, tokenizer, config.data, texts=texts)
    dataset, heldout = split_heldout(dataset, config)
    train_cfg = config.train.model_copy(update={"max_steps": config.steps_for(len(dataset))})
    seed_everything(config.train.seed)  # identical initial weights on every process
    model = build_model(config, tokenizer)
    if config.train.gradient_checkpointing:
        model.mlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info(
        "%s; bottleneck %s; %d training chunks (%d held out) from %d documents; %d steps (%.2f epochs); %d process(es) on %s",
        describe(model),
        model.bottleneck,
        len(dataset),
        len(heldout or []),
        len(texts),
        train_cfg.max_steps,
        train_cfg.max_steps * train_cfg.batch_size / len(dataset),
        accelerator.num_processes,
        accelerator.device,
    )
    trainer = PretrainTrainer(
        accelerator,
        model,
        dataset,
        build_collator(config, tokenizer),
        train_cfg,
        partial_dir / "checkpoints",
        run_config=config.canonical(),
    )
    hooks = []
    if heldout is not None:
        every = train_cfg.eval_every or train_cfg.log_every * 10
        hooks.append(HeldOutLoss(trainer, heldout, every, max(1, train_cfg.batch_size // train_cfg.grad_accum_steps)))
    state = trainer.train(resume=resume, stop_after=stop_after, hooks=hooks)
    losses = state.history("loss")
    metrics = {
        "final_loss": state.final_loss(),
        "initial_loss": (sum(losses[:10]) / max(len(losses[:10]), 1)) if losses else None,
        "steps": state.global_step,
        "steps_per_s": round(state.steps_per_s, 4),
        "resumed_from": state.resumed_from,
        "chunks": len(dataset),
        "documents": len(texts),
        "processes": accelerator.num_processes,
        "objective": config.objective,
        "decoding": config.decoding if config.objective == "retromae" else None,
        "bottleneck": model.bottleneck,
        "epochs": round(state.global_step * train_cfg.batch_size / len(dataset), 4),
        "heldout_chunks": len(heldout or []),
        "loss_history": losses,
        **heldout_curves(state),
    }
    if stop_after is not None and state.global_step < config.train.max_steps:
        return metrics
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(trainer.model).save(out_dir, tokenizer)
        history = {f"{name}_history": state.history(name) for name in ("loss", "encoder_loss", "decoder_loss")}
        history.update(heldout_curves(state))
        atomic_write_text(out_dir / "loss_history.json", json.dumps(history))
        write_pretraining_card(out_dir / ENCODER_DIR, config, sources, metrics)
    accelerator.wait_for_everyone()
    return metrics


HELDOUT_CURVES = ("heldout_step", "heldout_encoder_loss", "heldout_decoder_loss")


def heldout_curves(state) -> dict[str, list[float]]:
    """The held-out reconstruction losses and the steps they were measured at (empty without a held-out slice)."""
    return {f"{name}_history": state.history(name) for name in HELDOUT_CURVES if state.history(name)}


def write_pretraining_card(encoder_dir: Path, config: PretrainConfig, sources: list[Path], metrics: dict) -> None:
    """The encoder's README.md: what it was pretrained from, on what, with which objective."""
    from retroflow.artifacts import artifact_label
    from retroflow.model_card import card_from_model_dir, write_model_card

    # Store paths become stage/key labels: the card is one of the artifact's files, and the same
    # weights must give the same artifact on every store root.
    canonical = config.canonical()
    model = {k: artifact_label(v) if k in ("init", "tokenizer") and v else v for k, v in canonical["model"].items()}
    data = {
        **canonical["data"],
        "files": [artifact_label(f) for f in canonical["data"]["files"]],
        "beir_corpus": canonical["data"]["beir_corpus"] and artifact_label(canonical["data"]["beir_corpus"]),
    }
    base = model["init"] or f"from scratch ({config.model.preset} preset)"
    method = "plain MLM" if config.objective == "mlm" else f"RetroMAE ({config.decoding} decoding)"
    card = card_from_model_dir(
        encoder_dir,
        name=f"{Path(str(base)).name}, {method} pretraining",
        base_model=str(base),
        datasets=[source_label(p) for p in sources],
        configs={"pretrain": {**canonical, "model": model, "data": data}},
        training={
            k: metrics[k]
            for k in ("steps", "epochs", "final_loss", "chunks", "documents", "objective", "decoding", "bottleneck")
            if metrics.get(k) is not None
        },
        summary=f"A BERT encoder pretrained by retroflow with {method}; its sentence embedding is the "
        f"{'[CLS] state' if metrics.get('bottleneck', 'cls') == 'cls' else 'mean of its token states'} "
        "(the bottleneck it was trained through). "
        "It is meant to be fine-tuned into a retriever (`retroflow finetune`), though it can be scored zero-shot.",
    )
    write_model_card(encoder_dir, card)


def source_label(path: Path) -> str:
    """A pretraining source as a reader knows it: a dataset's name, else the file name."""
    path = Path(path)
    described = path.parent / "dataset.json"  # a prepared `data` artifact names its dataset
    if path.name == "corpus.parquet" and described.is_file():
        return json.loads(described.read_text()).get("name") or path.parent.name
    return path.parent.name if path.name == "corpus.jsonl" else path.name


# --------------------------------------------------------------------------- the stage contract


def run(
    config: PretrainConfig,
    inputs: Mapping[str, Input],
    out_dir: Path,
    partial_dir: Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
) -> dict:
    """The `pretrain` stage: write out_dir/encoder (HF model + tokenizer), out_dir/decoder and
    out_dir/loss_history.json.

    Inputs: `data` (a dataset: its corpus is the text; without it, the files `data.files` /
    `data.beir_corpus` name) and, from scratch, `tokenizer`. Checkpoints go to
    partial_dir/checkpoints and are resumed from when present (`resume`); `stop_after` ends the
    loop after that step without saving the model (how tests stand in for a kill)."""
    config = with_tokenizer(config, inputs)
    return _pretrain(config, out_dir, partial_dir, text_of(inputs), resume, stop_after)


def run_tokenizer_stage(config: PretrainConfig, inputs: Mapping[str, Input], out_dir: Path, partial_dir: Path) -> dict:
    """The `tokenizer` step of a from-scratch pretraining (its config: `tokenizer_config`), on input `data`.

    A stage of its own because `tokenizers` breaks frequency ties at the vocabulary's cut-off in
    hash-map order: two trainings on the same text can differ by a few tokens. Stored once, the
    tokenizer is an artifact the pretraining key depends on by content, and every run that
    shares it (ablation arms, seeds) tokenises identically."""
    return _train_tokenizer(config, out_dir, text_of(inputs))


def run_scratch_stage(config: PretrainConfig, inputs: Mapping[str, Input], out_dir: Path, partial_dir: Path) -> dict:
    """The `scratch` step of an ablation: the untrained from-scratch encoder, with input `tokenizer`."""
    return _save_scratch_init(with_tokenizer(config, inputs), out_dir)


def text_of(inputs: Mapping[str, Input]) -> list[Path] | None:
    """The pretraining text: the `data` input's corpus, else None (the config's own files)."""
    return [inputs["data"].file("corpus.parquet")] if "data" in inputs else None


def with_tokenizer(config: PretrainConfig, inputs: Mapping[str, Input]) -> PretrainConfig:
    if "tokenizer" not in inputs:
        return config
    return config.with_overrides(model={"tokenizer": str(inputs["tokenizer"].path)})
