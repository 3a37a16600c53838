"""Training checkpoints of every trained stage (retroflow.training's loop), loaded without unpickling.

A checkpoint directory `checkpoint-N/` holds:

    model.safetensors         the unwrapped model's weights (shared tensors stored once)
    optimizer.pt              the optimizer's state dict: tensors and numbers only
    rng-<rank>.pt             each process's torch / CUDA / numpy / python RNG states as tensors and lists
    scaler.pt                 the fp16 grad scaler's state, when there is one
    scheduler.json            the LR scheduler's state dict (numbers)
    trainer_state.json        step and loss histories; written last

Everything is read back with safetensors, `json` or `torch.load(weights_only=True)`, so a file
planted in a checkpoint directory cannot run code on `--resume` (it fails to load, with an error
naming it). The directory is written under a staging name (`checkpoint-N.tmp-<pid>-<origin>-<token>`,
retroflow.publish) and renamed only once every process has written its part, so a run killed
mid-save resumes from the previous complete checkpoint, and the next save sweeps the killed one's
staging directory; only `checkpoint-<N>` directories with their trainer state are checkpoints.

Pretraining, fine-tuning and the cross-encoder teacher all write this format. The teacher's earlier
single-file `checkpoint-N.pt` checkpoints are not read (`list_checkpoints` sees directories only).
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from retroflow.publish import remove_if_empty, replace_directory, staging_name

log = logging.getLogger("retroflow.checkpoints")

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}\d+")  # not a staging copy (checkpoint-N.tmp-...)
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.pt"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors, numbers, strings and containers."""


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    done = [
        p
        for p in directory.glob(f"{CHECKPOINT_PREFIX}*")
        if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and (p / TRAINER_STATE).is_file()
    ]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class DamagedCheckpointError(ValueError):
    """A checkpoint file is truncated or not what its name says."""


def safe_load(path: Path):
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends: whatever it is, it is not ours
        raise UnsafeCheckpointError(f"{path}: not a plain-tensor checkpoint file ({type(err).__name__}); refusing to load it") from None


def checkpoint_bytes(model, optimizer) -> int:
    """About what one checkpoint takes on disk: the weights plus every optimizer state tensor."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state_dict().get("state", {}).values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    if not optimizer.state_dict().get("state"):  # before the first step Adam holds no moments yet: two per weight
        total *= 3
    return total + (1 << 20)


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse before writing rather than leave a truncated checkpoint (torch reports a full disk as an iostream error)."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"a checkpoint needs about {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free", str(directory))


def shared_staging_name(accelerator, name: str) -> str:
    """The main process's staging name for `name`, the same on every process (each writes its RNG
    state there): it carries the main process's pid, which a later sweep checks for life."""
    names = [staging_name(name) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(names, from_process=0)
    return names[0]


def save_checkpoint(accelerator, directory: Path, step: int, trainer_state: dict, keep: int, *, model, optimizer, scheduler) -> Path:
    """Collective: every process must call it. Keeps the newest `keep` checkpoints."""
    final = directory / f"{CHECKPOINT_PREFIX}{step}"
    tmp = directory / shared_staging_name(accelerator, final.name)
    try:
        return _save_checkpoint(
            accelerator, directory, step, trainer_state, keep, final, tmp, model=model, optimizer=optimizer, scheduler=scheduler
        )
    except BaseException:
        if accelerator.is_main_process:  # a full disk, say: no half checkpoint, no empty folder
            shutil.rmtree(tmp, ignore_errors=True)
            remove_if_empty(directory)
        raise


def _save_checkpoint(
    accelerator, directory: Path, step: int, trainer_state: dict, keep: int, final: Path, tmp: Path, *, model, optimizer, scheduler
) -> Path:
    from safetensors.torch import save_model

    if accelerator.is_main_process:
        # the folder has one owner (its build holds the key's lock): any other staging copy is a
        # killed save's, whatever host or pid namespace it came from
        for leftover in directory.glob(f"{CHECKPOINT_PREFIX}*.tmp*") if directory.is_dir() else []:
            if leftover != tmp:
                shutil.rmtree(leftover, ignore_errors=True)
        check_free_space(directory, checkpoint_bytes(accelerator.unwrap_model(model), optimizer))
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model), str(tmp / MODEL_FILE))
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / SCALER_FILE)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint only takes space
        if isinstance(err, RuntimeError) and "iostream" not in str(err) and "write" not in str(err).lower():
            raise
        code = (
            err.errno
            if isinstance(err, OSError) and err.errno
            else errno.ENOSPC
            if shutil.disk_usage(directory).free < (64 << 20)
            else errno.EIO
        )
        raise OSError(
            code, f"writing the checkpoint failed ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})", str(tmp)
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}))
        replace_directory(tmp, final)  # a re-save of this step never leaves it half deleted
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def _damaged(path: Path, err: Exception | str) -> DamagedCheckpointError:
    detail = err if isinstance(err, str) else f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'unreadable'}"
    return DamagedCheckpointError(
        f"{path}: damaged checkpoint ({detail}); delete {path.parent.name if path.is_file() else path.name} "
        "to resume from the one before it, or run without --resume"
    )


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json, or a DamagedCheckpointError naming it."""
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(file, err) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _damaged(file, "no integer 'step'")
    return state


def _check_scheduler_state(file: Path, saved, current: dict) -> None:
    # LR schedulers accept any dict and fail steps later (a string step count, a list for a number):
    # compare with the fresh scheduler's own state, which has the same keys and types.
    if not isinstance(saved, dict):
        raise _damaged(file, f"expected a JSON object, got {type(saved).__name__}")
    for key, value in current.items():
        if key not in saved:
            raise _damaged(file, f"field '{key}' is missing")
        given = saved[key]
        numbers = (int, float)
        same = (
            (isinstance(given, numbers) and not isinstance(given, bool) and isinstance(value, numbers) and not isinstance(value, bool))
            or isinstance(value, type(None))
            or isinstance(given, type(value))
            or (isinstance(value, tuple) and isinstance(given, list))
        )
        if not same:
            raise _damaged(file, f"field '{key}' should be {type(value).__name__}, got {type(given).__name__} {given!r:.40}")


def restore(file: Path, apply) -> None:
    """`apply` the state in `file`; a file of the wrong shape is a damaged checkpoint, named."""
    state = safe_load(file)
    try:
        apply(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise _damaged(file, err) from None


def load_latest_checkpoint(accelerator, directory: Path, *, model, optimizer, scheduler, check=None) -> dict | None:
    """Restore the newest complete checkpoint into the objects; its trainer state, or None.

    `check(path, trainer_state)` runs before anything is restored (the config comparison)."""
    from safetensors.torch import load_model

    found = list_checkpoints(directory)
    if not found:
        return None
    path = found[-1]
    state = read_trainer_state(path)
    if check is not None:
        check(path, state)
    try:
        scheduler_state = json.loads((path / SCHEDULER_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path / SCHEDULER_FILE, err) from None
    _check_scheduler_state(path / SCHEDULER_FILE, scheduler_state, scheduler.state_dict())
    try:
        load_model(accelerator.unwrap_model(model), str(path / MODEL_FILE))
        optimizer.load_state_dict(safe_load(path / OPTIMIZER_FILE))
        scheduler.load_state_dict(scheduler_state)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # safetensors, JSON and state-dict errors alike: the files were damaged after saving
        raise _damaged(path, err) from None
    if accelerator.scaler is not None and (path / SCALER_FILE).is_file():
        restore(path / SCALER_FILE, lambda state: accelerator.scaler.load_state_dict(state))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file():
        restore(rng_file, set_rng_state)
    log.info("resumed from %s (step %d)", path, state["step"])
    return state
