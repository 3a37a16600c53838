"""Training loop on `accelerate`: DDP (torchrun, NCCL or gloo), bf16/fp16, checkpoints with RNG state.

Why a short loop on accelerate rather than HF Trainer: the loss must be normalised by the
*global* number of targets of an optimizer step (two losses, two counts) so that 2 processes
x micro-batches reproduce one big batch, and the data order must be a pure function of the
step so a resumed run continues exactly where the killed one stopped. Accelerate still does
the parts worth not rewriting: process-group setup, DDP wrapping, autocast/grad scaling.
Checkpoints are retroflow.checkpoints' pickle-free format (safetensors, weights-only tensors, JSON).
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from transformers import get_linear_schedule_with_warmup

from retroflow.checkpoints import load_latest_checkpoint, save_checkpoint
from retroflow.devices import pick_device, pick_dtype, step_optimizer
from retroflow.progress import progress_bar
from retromae.collator import IGNORE

log = logging.getLogger("retroflow.retromae")

MAX_LOADER_WORKERS = 4  # collation is ~40 ms per 32 x 512 micro-batch: a few workers hide it behind a GPU step


def make_accelerator(train_cfg) -> Accelerator:
    device = pick_device(train_cfg.device)
    dtype = pick_dtype(device, train_cfg.precision)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


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


@dataclass
class TrainResult:
    steps: int
    loss_history: list[float] = field(default_factory=list)
    encoder_loss_history: list[float] = field(default_factory=list)
    decoder_loss_history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_run: int = 0
    resumed_from: int | None = None

    @property
    def steps_per_s(self) -> float:
        return self.steps_run / self.seconds if self.seconds > 0 else 0.0

    def final_loss(self, window: int = 10) -> float:
        tail = self.loss_history[-window:]
        return sum(tail) / len(tail) if tail else math.nan


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PretrainTrainer:
    def __init__(self, accelerator: Accelerator, model, dataset, collator, train_cfg, checkpoint_dir: Path):
        self.acc = accelerator
        self.cfg = train_cfg
        self.dataset = dataset
        self.collator = collator
        self.checkpoint_dir = Path(checkpoint_dir)
        self.plan = BatchPlan(len(dataset), train_cfg.batch_size, train_cfg.seed)
        optimizer = torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr)
        warmup = int(train_cfg.warmup_ratio * train_cfg.max_steps)
        # the scheduler is not `prepare`d: accelerate would step it once per process
        self.scheduler = get_linear_schedule_with_warmup(optimizer, warmup, train_cfg.max_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.result = TrainResult(steps=0)

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
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, float]:
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
        if self.cfg.max_grad_norm:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        step_optimizer(self.optimizer, self.scheduler)
        self.optimizer.zero_grad(set_to_none=True)
        totals = self.acc.reduce(totals, reduction="mean") if world > 1 else totals
        return tuple(float(x) for x in totals)

    # ---------------------------------------------------------------------------- loop
    def train(self, resume: bool = True, stop_after: int | None = None, on_step: Callable | None = None) -> TrainResult:
        start = self._maybe_resume() if resume else 0
        total = self.cfg.max_steps
        self.model.train()
        bar = progress_bar(total=total, initial=start, desc="pretrain", disable=not self.acc.is_main_process, dynamic_ncols=True)
        began, window_start = time.perf_counter(), time.perf_counter()
        for step, micro_batches in zip(range(start, total), self.batches(start)):
            loss, enc, dec = self.train_step(micro_batches)
            self.result.loss_history.append(loss)
            self.result.encoder_loss_history.append(enc)
            self.result.decoder_loss_history.append(dec)
            self.result.steps = step + 1
            self.result.steps_run += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if (step + 1) % self.cfg.log_every == 0 or step + 1 == total:
                rate = self.cfg.log_every / max(time.perf_counter() - window_start, 1e-9)
                window_start = time.perf_counter()
                log.info("step %d/%d loss %.4f (enc %.4f dec %.4f) lr %.2e %.2f steps/s",
                         step + 1, total, loss, enc, dec, self.scheduler.get_last_lr()[0], rate)
            if (step + 1) % self.cfg.save_every == 0 and step + 1 < total:
                self.save_checkpoint(step + 1)
            if on_step is not None:
                on_step(step + 1, loss)
            if stop_after is not None and step + 1 >= stop_after:
                break
        bar.close()
        self.result.seconds = time.perf_counter() - began
        return self.result

    # ---------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> Path:
        history = {
            "loss_history": self.result.loss_history,
            "encoder_loss_history": self.result.encoder_loss_history,
            "decoder_loss_history": self.result.decoder_loss_history,
        }
        return save_checkpoint(self.acc, self.checkpoint_dir, step, history, self.cfg.keep_checkpoints,
                               model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)  # fmt: skip

    def _maybe_resume(self) -> int:
        state = load_latest_checkpoint(self.acc, self.checkpoint_dir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        if state is None:
            return 0
        self.result.loss_history = list(state["loss_history"])
        self.result.encoder_loss_history = list(state.get("encoder_loss_history", []))
        self.result.decoder_loss_history = list(state.get("decoder_loss_history", []))
        self.result.steps = self.result.resumed_from = int(state["step"])
        return int(state["step"])
