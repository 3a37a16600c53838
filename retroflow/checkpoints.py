"""Training checkpoints shared by the pretraining and fine-tuning trainers.

A checkpoint is accelerate's `save_state` (model, optimizer, scheduler, every process's RNG) plus
a small JSON trainer state (step, loss histories). It is written to `checkpoint-N.tmp` and renamed
only once every process has written its part, so a run killed mid-save resumes from the previous
complete checkpoint; a directory without the trainer state is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger("retroflow.checkpoints")

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    done = [p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / TRAINER_STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(accelerator, directory: Path, step: int, trainer_state: dict, keep: int, safe_serialization: bool = True) -> Path:
    """Collective: every process must call it. Keeps the newest `keep` checkpoints."""
    final = directory / f"{CHECKPOINT_PREFIX}{step}"
    tmp = directory / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=safe_serialization)
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(accelerator, directory: Path) -> dict | None:
    """Restore the newest complete checkpoint into `accelerator`'s objects; its trainer state, or None."""
    found = list_checkpoints(directory)
    if not found:
        return None
    accelerator.load_state(str(found[-1]))
    state = json.loads((found[-1] / TRAINER_STATE).read_text())
    log.info("resumed from %s (step %d)", found[-1], state["step"])
    return state
