"""RetroMAE pretraining on retroflow.training's loop: the batch plan and the loss of one step.

The loss must be normalised by the *global* number of targets of an optimizer step (two losses,
two counts) so that 2 processes x micro-batches reproduce one big batch, and the data order must
be a pure function of the step so a resumed run continues exactly where the killed one stopped.
Accelerate does process-group setup, DDP wrapping, autocast/grad scaling; the shared loop does
resumption, checkpoints (retroflow.checkpoints' format), progress and logging.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from retroflow.training import (
    LoopSettings,
    TrainerState,
    TrainingHook,
    TrainingLoop,
    apply_gradients,
    make_optimizer,
    mean_over_processes,
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
        optimizer, self.scheduler = make_optimizer(model, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                                   warmup_ratio=train_cfg.warmup_ratio, total_steps=train_cfg.max_steps)  # fmt: skip
        self.model, self.optimizer = accelerator.prepare(model, optimizer)

    # ---------------------------------------------------------------------------- batches
    def batches(self, start: int) -> DataLoader:
        """Micro-batches of steps start..max_steps-1, collated ahead of the step on CUDA hosts."""
        steps = StepBatches(self.plan, self.dataset, self.collator, range(start, self.cfg.max_steps),
                            self.acc.process_index, self.acc.num_processes, self.cfg.grad_accum_steps)  # fmt: skip
        workers = loader_workers(self.acc.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # set by torchrun
        cuda = self.acc.device.type == "cuda"
        # own generator: the loader draws a worker base seed when iterated, and that draw must not
        # come from the global RNG that dropout uses and checkpoints restore (exact resume)
        return DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers, pin_memory=cuda,
                          generator=torch.Generator().manual_seed(self.cfg.seed))  # fmt: skip

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

    # ---------------------------------------------------------------------------- loop
    def train(self, resume: bool = True, stop_after: int | None = None, hooks: Sequence[TrainingHook] = ()) -> TrainerState:
        settings = LoopSettings(label="pretrain", max_steps=self.cfg.max_steps, checkpoint_dir=self.checkpoint_dir,
                                save_every=self.cfg.save_every, keep_checkpoints=self.cfg.keep_checkpoints, log_every=self.cfg.log_every,
                                config=self.run_config)  # fmt: skip
        loop = TrainingLoop(self.acc, self.model, self.optimizer, self.scheduler, settings)
        return loop.run(self, resume=resume, stop_after=stop_after, hooks=hooks)
