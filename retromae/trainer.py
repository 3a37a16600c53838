"""RetroMAE pretraining on retroflow.training's loop: the batch plan and the loss of one step.

The loss must be normalised by the *global* number of targets of an optimizer step (two losses,
two counts) so that 2 processes x micro-batches reproduce one big batch, and the data order must
be a pure function of the step so a resumed run continues exactly where the killed one stopped.
Accelerate does process-group setup, DDP wrapping, autocast/grad scaling; the shared loop does
resumption, checkpoints (retroflow.checkpoints' format), progress and logging.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from retroflow.training import (
    LoopSettings,
    TrainerState,
    TrainingHook,
    TrainingLoop,
    apply_gradients,
    mean_over_processes,
    param_groups,
)
from retromae.collator import IGNORE

MAX_LOADER_WORKERS = 4  # collation is ~40 ms per 32 x 512 micro-batch: a few workers hide it behind a GPU step


class BatchPlan:
    """Which samples make up global step s: a pure function of (seed, step), no iterator state.

    Sample slot p = s * batch + j walks through per-epoch permutations; `p` doubles as the
    sample's mask key, so a document seen in two epochs gets two different maskings.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        if num_samples < 1:
            raise ValueError("the pretraining dataset is empty")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """[(dataset index, mask key)] for the whole optimizer step."""
        slots = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [(int(self._permutation(p // self.num_samples)[p % self.num_samples]), p) for p in slots]

    def micro_batches(self, step: int, rank: int, world: int, accum: int) -> list[list[tuple[int, int]]]:
        """This process's contiguous share of the global batch, cut into `accum` micro-batches."""
        plan = self.global_batch(step)
        if len(plan) % (world * accum):
            raise ValueError(f"batch_size {len(plan)} does not split into {world} processes x {accum} micro-batches")
        share = len(plan) // world
        mine = plan[rank * share : (rank + 1) * share]
        micro = share // accum
        return [mine[i * micro : (i + 1) * micro] for i in range(accum)]


class StepBatches(Dataset):
    """Item i: this process's collated micro-batches for optimizer step `steps[i]`.

    Indexed by step, not iterated from saved state: a batch is a pure function of (seed, step),
    so a DataLoader over these items can collate in worker processes, ahead of the model, and a
    resumed run just starts the range at its checkpoint step.
    """

    def __init__(self, plan: BatchPlan, dataset, collator, steps: range, rank: int, world: int, accum: int):
        self.plan, self.dataset, self.collator, self.steps = plan, dataset, collator, steps
        self.rank, self.world, self.accum = rank, world, accum

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        micro = self.plan.micro_batches(self.steps[i], self.rank, self.world, self.accum)
        return [self._collate(items) for items in micro]

    def _collate(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows = self.dataset[[i for i, _ in items]]["input_ids"]
        return self.collator([{"input_ids": ids, "mask_key": key} for ids, (_, key) in zip(rows, items)])


def loader_workers(device: torch.device, processes_per_host: int) -> int:
    """Collation workers: none on CPU, where they would take cores from the training step itself."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_LOADER_WORKERS, cores // max(processes_per_host, 1) - 1))


def head_parameter_names(model) -> set[str]:
    """What a sentence-encoder init lacks: the decoder layers and the MLM head, less its output
    matrix (tied to the word embeddings, which the encoder owns)."""
    tied = model.mlm.get_output_embeddings().weight
    names = {f"decoder.{n}" for n, _ in model.decoder.named_parameters()}
    head = {id(p) for p in model.head.parameters() if p is not tied}
    names |= {n for n, p in model.named_parameters() if id(p) in head}
    return names


def linear_factor(step: int, start: int, total: int, warmup_ratio: float) -> float:
    """transformers' linear warm-up-then-decay over steps start..total (0 before start)."""
    if step < start:
        return 0.0
    span, step = total - start, step - start
    warmup = int(warmup_ratio * span)
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (span - step) / max(1, span - warmup))


def make_pretrain_optimizer(model, cfg, total_steps: int):
    """AdamW over two parameter sets, each with its own rate and schedule: the encoder (frozen by a
    zero rate for the first `head_warmup_steps`, then warmed up and decayed over the rest) and the
    heads (`head_lr`, scheduled over the whole run). Without head options it is the single linear
    schedule of `retroflow.training.make_optimizer`, step for step."""
    heads = head_parameter_names(model)
    named = list(model.named_parameters())
    groups, factors = [], []
    for is_head, lr, start in ((False, cfg.lr, cfg.head_warmup_steps), (True, cfg.head_lr or cfg.lr, 0)):
        for group in param_groups([(n, p) for n, p in named if (n in heads) == is_head], cfg.weight_decay):
            if group["params"]:
                groups.append({**group, "lr": lr})
                factors.append(lambda step, start=start: linear_factor(step, start, total_steps, cfg.warmup_ratio))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


class HeldOutLoss(TrainingHook):
    """The reconstruction loss of chunks kept out of training, every `every` steps and at the end:
    fixed masks (mask keys past any training slot), eval mode (no dropout, no RNG drawn), so a
    resumed run logs the same values. Kept in the state's histories (checkpointed with it)."""

    KEY_OFFSET = 1 << 40

    def __init__(self, trainer: PretrainTrainer, heldout, every: int, batch_size: int):
        self.trainer, self.heldout, self.every, self.batch_size = trainer, heldout, every, batch_size

    def on_step_end(self, loop: TrainingLoop, losses: dict[str, float]) -> None:
        step = loop.state.global_step
        if step % self.every and step != loop.state.max_steps:
            return
        values = self.trainer.heldout_losses(self.heldout, self.batch_size, self.KEY_OFFSET)
        for name, value in (("heldout_step", float(step)), *values.items()):
            loop.state.histories.setdefault(name, []).append(value)


class PretrainTrainer:
    """RetroMAE's part of retroflow.training's loop: the batch plan and the step's loss."""

    def __init__(self, accelerator: Accelerator, model, dataset, collator, train_cfg, checkpoint_dir: Path, run_config: dict | None = None):
        self.acc = accelerator
        self.run_config = run_config  # the whole PretrainConfig, canonical: checkpoints keep it, resumes compare it
        self.cfg = train_cfg
        self.dataset = dataset
        self.collator = collator
        self.checkpoint_dir = Path(checkpoint_dir)
        self.plan = BatchPlan(len(dataset), train_cfg.batch_size, train_cfg.seed)
        optimizer, self.scheduler = make_pretrain_optimizer(model, train_cfg, train_cfg.max_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)

    # ---------------------------------------------------------------------------- batches
    def batches(self, start: int) -> DataLoader:
        """Micro-batches of steps start..max_steps-1, collated ahead of the step on CUDA hosts."""
        steps = StepBatches(
            self.plan,
            self.dataset,
            self.collator,
            range(start, self.cfg.max_steps),
            self.acc.process_index,
            self.acc.num_processes,
            self.cfg.grad_accum_steps,
        )
        workers = loader_workers(self.acc.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # set by torchrun
        cuda = self.acc.device.type == "cuda"
        # own generator: the loader draws a worker base seed when iterated, and that draw must not
        # come from the global RNG that dropout uses and checkpoints restore (exact resume)
        return DataLoader(
            steps,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=cuda,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # pinned host memory (CUDA hosts) makes the copy asynchronous with the running step
        return {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}

    def _global_counts(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets of the whole optimizer step (all micro-batches, all processes)."""
        counts = torch.zeros(2, device=self.acc.device, dtype=torch.float64)
        for batch in batches:
            counts[0] += (batch["labels"] != IGNORE).sum()
            if "decoder_labels" in batch:
                counts[1] += (batch["decoder_labels"] != IGNORE).sum()
        if self.acc.num_processes > 1:
            counts = self.acc.reduce(counts, reduction="sum")
        return counts[0], counts[1]

    # ---------------------------------------------------------------------------- one step
    def train_step(self, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        batches = [self._to_device(b) for b in micro_batches]
        enc_count, dec_count = self._global_counts(batches)
        # DDP averages gradients over processes, so each process scales its share by world size
        world = self.acc.num_processes
        enc_norm, dec_norm = enc_count / world, dec_count / world
        totals = torch.zeros(3, device=self.acc.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with self.acc.no_sync(self.model) if not last else nullcontext():
                out = self.model(**batch, encoder_normaliser=enc_norm, decoder_normaliser=dec_norm)
                self.acc.backward(out.loss)
            totals[0] += out.loss.detach().float()
            totals[1] += out.encoder_loss.detach().float()
            if out.decoder_loss is not None:
                totals[2] += out.decoder_loss.detach().float()
        apply_gradients(self.acc, self.model, self.optimizer, self.scheduler, self.cfg.max_grad_norm)
        loss, encoder_loss, decoder_loss = (float(x) for x in mean_over_processes(self.acc, totals))
        return {"loss": loss, "encoder_loss": encoder_loss, "decoder_loss": decoder_loss}

    @torch.no_grad()
    def heldout_losses(self, heldout, batch_size: int, key_offset: int) -> dict[str, float]:
        """Mean encoder / decoder loss per target over the held-out chunks (every process computes
        the same figure on the whole set: it is small)."""
        model = self.acc.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        sums = {"heldout_encoder_loss": 0.0, "heldout_decoder_loss": 0.0}
        counts = {"heldout_encoder_loss": 0, "heldout_decoder_loss": 0}
        try:
            for start in range(0, len(heldout), batch_size):
                rows = heldout[start : start + batch_size]["input_ids"]
                batch = self._to_device(
                    self.collator([{"input_ids": ids, "mask_key": key_offset + start + j} for j, ids in enumerate(rows)])
                )
                with self.acc.autocast():
                    out = model(**batch, encoder_normaliser=1.0, decoder_normaliser=1.0)  # sums: divided below
                sums["heldout_encoder_loss"] += float(out.encoder_loss)
                counts["heldout_encoder_loss"] += int((batch["labels"] != IGNORE).sum())
                if out.decoder_loss is not None:
                    sums["heldout_decoder_loss"] += float(out.decoder_loss)
                    counts["heldout_decoder_loss"] += int((batch["decoder_labels"] != IGNORE).sum())
        finally:
            model.train(was_training)
        return {name: sums[name] / counts[name] for name in sums if counts[name]}

    # ---------------------------------------------------------------------------- loop
    def train(self, resume: bool = True, stop_after: int | None = None, hooks: Sequence[TrainingHook] = ()) -> TrainerState:
        settings = LoopSettings(
            label="pretrain",
            max_steps=self.cfg.max_steps,
            checkpoint_dir=self.checkpoint_dir,
            save_every=self.cfg.save_every,
            keep_checkpoints=self.cfg.keep_checkpoints,
            log_every=self.cfg.log_every,
            config=self.run_config,
        )
        loop = TrainingLoop(self.acc, self.model, self.optimizer, self.scheduler, settings)
        return loop.run(self, resume=resume, stop_after=stop_after, hooks=hooks)
