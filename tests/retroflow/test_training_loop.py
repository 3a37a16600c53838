"""retroflow.training on a toy stage: exact resume, hook order, early stop (the stages' own tests cover the real losses)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from retroflow.checkpoints import list_checkpoints
from retroflow.training import LoopSettings, TrainingHook, TrainingLoop, apply_gradients, make_accelerator, make_optimizer, param_groups

STEPS = 6


class ToyStage:
    """Noisy linear regression: the noise comes from the global RNG, so only a restored RNG resumes exactly."""

    def __init__(self, checkpoint_dir: Path):
        self.acc = make_accelerator(SimpleNamespace(device="cpu", precision="fp32"))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
        optimizer, self.scheduler = make_optimizer(model, lr=0.05, weight_decay=0.01, warmup_ratio=0.2, total_steps=STEPS)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.settings = LoopSettings(
            label="toy", max_steps=STEPS, checkpoint_dir=checkpoint_dir, save_every=2, keep_checkpoints=2, log_every=3
        )
        self.scale = 1.0  # a hook may change it before a step draws its batch
        self.zero_targets: list[bool] = []  # per step run: whether its batch was drawn with scale 0

    def batches(self, start: int):
        for step in range(start, STEPS):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))  # a pure function of the step
            yield x, x.sum(1, keepdim=True) * self.scale

    def train_step(self, step: int, batch) -> dict[str, float]:
        x, y = batch
        self.zero_targets.append(bool((y == 0).all()))
        loss = torch.nn.functional.mse_loss(self.model(x + 0.1 * torch.randn_like(x)), y)
        self.acc.backward(loss)
        apply_gradients(self.acc, self.model, self.optimizer, self.scheduler, max_grad_norm=1.0)
        return {"loss": loss.item(), "double": 2 * loss.item()}

    def train(self, resume: bool = True, stop_after: int | None = None, hooks=()):
        loop = TrainingLoop(self.acc, self.model, self.optimizer, self.scheduler, self.settings)
        return loop.run(self, resume=resume, stop_after=stop_after, hooks=hooks)


def weights(stage: ToyStage) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in stage.acc.unwrap_model(stage.model).state_dict().items()}


def test_a_stopped_run_resumed_equals_an_uninterrupted_one(tmp_path):
    full_stage = ToyStage(tmp_path / "full")
    full = full_stage.train()
    assert full.global_step == STEPS and full.resumed_from is None and len(full.history("double")) == STEPS

    stopped = ToyStage(tmp_path / "part").train(stop_after=3)
    assert stopped.global_step == 3
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["checkpoint-2"]
    torch.manual_seed(123)  # whatever the new process's RNG holds, the checkpoint's comes back
    resumed_stage = ToyStage(tmp_path / "part")
    resumed = resumed_stage.train()
    assert resumed.resumed_from == 2 and resumed.steps_run == 4
    assert resumed.histories == full.histories
    a, b = weights(full_stage), weights(resumed_stage)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # checkpoints stop short of the last step (the stage saves its final model itself)
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["checkpoint-2", "checkpoint-4"]


class Recorder(TrainingHook):
    def __init__(self, stage: ToyStage):
        self.stage, self.calls = stage, []

    def on_train_begin(self, loop):
        self.calls.append(("begin", loop.state.global_step))

    def on_step_begin(self, loop, step):
        self.calls.append(("step", step))
        self.stage.scale = 0.0 if step == 3 else 1.0  # seen by this very step's batch

    def on_step_end(self, loop, losses):
        self.calls.append(("done", loop.state.global_step, round(losses["loss"], 6)))

    def on_train_end(self, loop):
        self.calls.append(("end", loop.state.global_step))


def test_hooks_see_the_resumed_step_and_change_the_next_batch(tmp_path):
    ToyStage(tmp_path).train(stop_after=2)
    stage = ToyStage(tmp_path)
    recorder = Recorder(stage)
    stage.train(stop_after=4, hooks=[recorder])
    kinds = [(c[0], c[1]) for c in recorder.calls]
    assert kinds == [("begin", 2), ("step", 2), ("done", 3), ("step", 3), ("done", 4), ("end", 4)]
    assert stage.zero_targets == [False, True]


def test_without_resume_a_run_starts_over(tmp_path):
    ToyStage(tmp_path).train(stop_after=4)
    again = ToyStage(tmp_path).train(resume=False)
    assert again.resumed_from is None and again.steps_run == STEPS


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])] and len(no_decay["params"]) == 3
    assert decay["weight_decay"] == pytest.approx(0.1) and no_decay["weight_decay"] == 0.0


def test_a_save_killed_before_its_rename_is_no_checkpoint_and_is_swept(tmp_path):
    """A kill between writing the trainer state and the rename leaves a complete-looking staging copy:
    it is not resumed from, and the next save removes it (its pid is dead)."""
    import shutil

    from retroflow.publish import staging_name

    stage = ToyStage(tmp_path)
    stage.train(stop_after=3)
    killed = tmp_path / staging_name("checkpoint-4").replace(f".tmp-{os.getpid()}-", ".tmp-999999999-", 1)
    shutil.copytree(tmp_path / "checkpoint-2", killed)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert ToyStage(tmp_path).train().resumed_from == 2
    assert not killed.exists()


@pytest.mark.parametrize("planted", [{"x": torch.zeros(1)}, torch.zeros(3)])
def test_an_rng_state_of_the_wrong_shape_is_a_damaged_checkpoint_named(tmp_path, planted):
    from retroflow.checkpoints import DamagedCheckpointError

    ToyStage(tmp_path).train(stop_after=3)
    torch.save(planted, tmp_path / "checkpoint-2" / "rng-0.pt")  # loads without pickle, but is not an RNG state
    with pytest.raises(DamagedCheckpointError, match=r"rng-0\.pt: damaged checkpoint"):
        ToyStage(tmp_path).train()
