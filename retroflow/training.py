"""One training loop for every trained stage: RetroMAE pretraining, DPR fine-tuning, the cross-encoder teacher.

A stage supplies its model, optimizer and scheduler (`make_accelerator`, `make_optimizer`), a
batch plan (`batches`) and a `train_step`; `TrainingLoop` does the rest the same way for all of
them: resume from the newest checkpoint, progress bar, loss log, checkpoints every `save_every`
steps, an early stop for tests. The shape follows Hugging Face's Trainer (`TrainerState`,
`TrainerCallback`), kept small because the stages need two things Trainer makes hard:

- exact resume: a stage's batches are a pure function of (seed, step), so resuming is restoring
  weights, optimizer, scheduler, RNG and the `TrainerState`, then starting the step range at the
  checkpoint's step -- no iterator state to save;
- losses normalised over the global batch of a step (each stage's `train_step` does that), so
  two processes reproduce one.

Checkpoints are retroflow.checkpoints' pickle-free format, the same for every stage.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from retroflow.checkpoints import load_latest_checkpoint, save_checkpoint
from retroflow.devices import pick_device, pick_dtype, step_optimizer
from retroflow.progress import progress_bar

log = logging.getLogger("retroflow.training")

HISTORY_SUFFIX = "_history"  # trainer_state.json keeps each loss's history as "<loss name>_history"
CONFIG_KEY = "config"  # trainer_state.json keeps the run's canonical config, compared on resume

# Config fields (by their last name, in any section) a resume may change: how long to train and how
# often to log and save change no step already taken, nor the device where a step is computed.
# Anything else would continue one training under another's settings.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "epochs", "log_every", "save_every", "keep_checkpoints", "device", "show_progress", "eval_every"}
)


class ResumeConfigError(ValueError):
    """--resume asked to continue a checkpoint under a config that differs from the one it was trained with."""


def _flatten(config, prefix: str = "") -> dict[str, object]:
    if isinstance(config, dict):
        out: dict[str, object] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: config}


def config_differences(saved: dict, current: dict, allowed: frozenset[str] = RESUMABLE_CHANGES) -> list[str]:
    """'field: checkpoint value -> current value' for every field that differs and may not change on resume."""
    old, new = _flatten(saved), _flatten(current)
    missing = object()
    changes = []
    for name in sorted(old.keys() | new.keys()):
        if name.rsplit(".", 1)[-1] in allowed:
            continue
        before, after = old.get(name, missing), new.get(name, missing)
        if before != after:
            changes.append(
                f"{name}: {'(absent)' if before is missing else repr(before)} -> {'(absent)' if after is missing else repr(after)}"
            )
    return changes


def run_identity(config: dict, *, dataset=None, init: str | Path | None = None) -> dict:
    """`config` with its `dataset` / `init` names replaced by what the stage was actually given (the
    loaded dataset's content fingerprint, the resolved model path): library callers and store stages
    pass those beside the config, whose names may then say something else."""
    out = dict(config)
    fingerprint = getattr(dataset, "fingerprint", None)
    if fingerprint:
        out["dataset"] = f"{getattr(dataset, 'name', '')} (content {fingerprint})"
    if init is not None:
        out["init"] = str(init)
    return out


def check_resume_config(checkpoint: Path, saved_state: dict, config: dict | None) -> None:
    """Refuse to resume `checkpoint` under `config` unless they differ only in RESUMABLE_CHANGES."""
    if config is None:
        return
    saved = saved_state.get(CONFIG_KEY)
    if saved is None:
        log.warning("%s records no config (written by an older retroflow): cannot check that the resumed run's config matches", checkpoint)
        return
    changes = config_differences(saved, config)
    if changes:
        raise ResumeConfigError(
            f"{checkpoint}: cannot resume, the config differs from the one this checkpoint was trained with "
            f"({'; '.join(changes)}); only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume. "
            "Restore those values, or start a new run without --resume (or in another output directory)"
        )


# ---------------------------------------------------------------------------------------- parts


def make_accelerator(settings):
    """An Accelerator for `settings.device` and `settings.precision` (any config section that has both)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = pick_device(settings.device)
    dtype = pick_dtype(device, settings.precision)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        # accelerate keeps one precision per process; stages of one chain may differ (an fp32
        # stage after a bf16 one). The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


def param_groups(model: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (the usual BERT recipe). Takes a module or
    (name, parameter) pairs (a part of a module)."""
    decay, no_decay = [], []
    named = model.named_parameters() if isinstance(model, torch.nn.Module) else model
    for name, param in named:
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int):
    """(AdamW, linear warmup-then-decay schedule). Pass only the optimizer to `accelerator.prepare`:
    a prepared scheduler would be stepped once per process."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)


def apply_gradients(accelerator, model, optimizer, scheduler, max_grad_norm: float | None) -> None:
    """The end of every train_step: clip, step the optimizer (and the schedule, unless the fp16
    scaler skipped the step), clear the gradients."""
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    step_optimizer(optimizer, scheduler)
    optimizer.zero_grad(set_to_none=True)


def mean_over_processes(accelerator, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="mean") if accelerator.num_processes > 1 else values


# ---------------------------------------------------------------------------------------- state


@dataclass
class TrainerState:
    """Where a run stands. `global_step` and the loss histories go into every checkpoint and come
    back on resume; `resumed_from`, `steps_run` and `seconds` describe this process's run only."""

    max_steps: int
    global_step: int = 0
    histories: dict[str, list[float]] = field(default_factory=dict)  # loss name -> one value per step, from step 0
    resumed_from: int | None = None
    steps_run: int = 0
    seconds: float = 0.0

    def record(self, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            self.histories.setdefault(name, []).append(value)
        self.global_step += 1
        self.steps_run += 1

    def history(self, name: str = "loss") -> list[float]:
        return self.histories.get(name, [])

    def final_loss(self, window: int = 10) -> float:
        tail = self.history()[-window:]
        return float(sum(tail) / len(tail)) if tail else math.nan

    @property
    def steps_per_s(self) -> float:
        return self.steps_run / self.seconds if self.seconds > 0 else 0.0

    def to_checkpoint(self) -> dict[str, list[float]]:
        """What trainer_state.json holds besides the step (retroflow.checkpoints writes that)."""
        return {name + HISTORY_SUFFIX: values for name, values in self.histories.items()}

    def restore(self, saved: dict) -> None:
        self.global_step = self.resumed_from = int(saved["step"])
        self.histories = {key[: -len(HISTORY_SUFFIX)]: list(values) for key, values in saved.items() if key.endswith(HISTORY_SUFFIX)}


# ---------------------------------------------------------------------------------------- hooks


class TrainingHook:
    """Called by TrainingLoop at fixed points; override what you need (each default does nothing).

    `loop.state` is current at every call. A hook ends the run after the current step by setting
    `loop.should_stop`."""

    def on_train_begin(self, loop: TrainingLoop) -> None:
        """After a resume: `loop.state.global_step` is the first step to run."""

    def on_step_begin(self, loop: TrainingLoop, step: int) -> None:
        """Before step `step` (0-based) draws its batch: a hook may still change what the batch is made of."""

    def on_step_end(self, loop: TrainingLoop, losses: dict[str, float]) -> None:
        """After the optimizer step; `loop.state.global_step` counts it."""

    def on_train_end(self, loop: TrainingLoop) -> None:
        """After the last step run, also when stopped early."""


class ProgressBar(TrainingHook):
    def on_train_begin(self, loop: TrainingLoop) -> None:
        self.bar = progress_bar(
            total=loop.state.max_steps,
            initial=loop.state.global_step,
            desc=loop.settings.label,
            disable=not loop.accelerator.is_main_process,
            dynamic_ncols=True,
        )

    def on_step_end(self, loop: TrainingLoop, losses: dict[str, float]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{losses['loss']:.3f}", refresh=False)

    def on_train_end(self, loop: TrainingLoop) -> None:
        self.bar.close()


class LossLog(TrainingHook):
    """A log line every `every` steps and at the last one: each loss averaged over the steps since
    the previous line (one step's loss is too noisy to read), the learning rate, the speed."""

    def __init__(self, every: int):
        self.every = every

    def on_train_begin(self, loop: TrainingLoop) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def on_step_end(self, loop: TrainingLoop, losses: dict[str, float]) -> None:
        self.window_steps += 1
        step, total = loop.state.global_step, loop.state.max_steps
        if step % self.every and step != total:
            return
        if loop.accelerator.is_main_process:
            means = " ".join(f"{name} {sum(loop.state.history(name)[-self.window_steps :]) / self.window_steps:.4f}" for name in losses)
            rate = self.window_steps / max(time.perf_counter() - self.window_start, 1e-9)
            log.info("%s step %d/%d %s lr %.2e %.2f steps/s", loop.settings.label, step, total, means, loop.learning_rate(), rate)
        self.window_start, self.window_steps = time.perf_counter(), 0


class SaveCheckpoints(TrainingHook):
    """Every `every` steps, short of the last (the stage saves its final model itself)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, loop: TrainingLoop, losses: dict[str, float]) -> None:
        step = loop.state.global_step
        if step % self.every == 0 and step < loop.state.max_steps:
            loop.save_checkpoint()


class StopAfter(TrainingHook):
    """End the run once `steps` steps are done, as a kill would (tests of resumption use it)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, loop: TrainingLoop, losses: dict[str, float]) -> None:
        if loop.state.global_step >= self.steps:
            loop.should_stop = True


# ---------------------------------------------------------------------------------------- loop


class TrainingStage(Protocol):
    """What a stage gives the loop besides its model, optimizer and scheduler."""

    def batches(self, start: int) -> Iterable[Any]:
        """The inputs of steps start, start + 1, ... The loop draws the next one after the
        on_step_begin hooks, so a lazy iterator sees their changes (the ANCE refresh swaps
        the negative pools); an iterator that prefetches must not depend on hooks."""

    def train_step(self, step: int, batch: Any) -> dict[str, float]:
        """Forward, backward and `apply_gradients` for one optimizer step. Returns the step's
        losses by name, "loss" first, averaged over processes."""


@dataclass(frozen=True)
class LoopSettings:
    label: str  # names the stage in the progress bar and the log lines
    max_steps: int
    checkpoint_dir: Path
    save_every: int
    keep_checkpoints: int
    log_every: int
    config: dict | None = None  # the stage's canonical config, saved with every checkpoint and checked on resume


class TrainingLoop:
    """Runs a stage's optimizer steps from the newest checkpoint (or step 0) to `max_steps`."""

    def __init__(self, accelerator, model, optimizer, scheduler, settings: LoopSettings):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.settings = settings
        self.state = TrainerState(settings.max_steps)
        self.should_stop = False

    def run(
        self, stage: TrainingStage, *, resume: bool = True, stop_after: int | None = None, hooks: Sequence[TrainingHook] = ()
    ) -> TrainerState:
        """Hooks run in this order: progress bar, loss log, checkpoint saving, the stage's `hooks`, the early stop."""
        if resume:
            self.restore_latest_checkpoint()
        everyone = [ProgressBar(), LossLog(self.settings.log_every), SaveCheckpoints(self.settings.save_every), *hooks]
        if stop_after is not None:
            everyone.append(StopAfter(stop_after))
        self.model.train()
        began = time.perf_counter()
        for hook in everyone:
            hook.on_train_begin(self)
        batches = iter(stage.batches(self.state.global_step))
        for step in range(self.state.global_step, self.settings.max_steps):
            for hook in everyone:
                hook.on_step_begin(self, step)
            losses = stage.train_step(step, next(batches))
            self.state.record(losses)
            for hook in everyone:
                hook.on_step_end(self, losses)
            if self.should_stop:
                break
        for hook in everyone:
            hook.on_train_end(self)
        self.state.seconds = time.perf_counter() - began
        return self.state

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self) -> Path:
        """Collective: every process calls it (the hook does, on every process)."""
        trainer_state = self.state.to_checkpoint()
        if self.settings.config is not None:
            trainer_state[CONFIG_KEY] = self.settings.config
        return save_checkpoint(
            self.accelerator,
            self.settings.checkpoint_dir,
            self.state.global_step,
            trainer_state,
            self.settings.keep_checkpoints,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )

    def restore_latest_checkpoint(self) -> None:
        saved = load_latest_checkpoint(
            self.accelerator,
            self.settings.checkpoint_dir,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            check=lambda path, state: check_resume_config(path, state, self.settings.config),
        )
        if saved is not None:
            self.state.restore(saved)
