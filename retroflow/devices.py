"""Device and precision choice in one place: CUDA + bf16 when present, CPU fp32 otherwise."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext

import numpy as np
import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available on this machine")
    return device


def has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8.0 (Ampere) or newer. Older GPUs (V100 7.0, T4 7.5)
    may report bf16 support that torch emulates, far slower than fp16 with a grad scaler."""
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """'auto' = bf16 on Ampere and newer, fp16 (trained with a grad scaler) on older GPUs, fp32 on CPU."""
    if precision == "fp32" or device.type != "cuda":
        return torch.float32  # half precision on CPU is slower and less accurate here
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or has_native_bf16(device):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def step_optimizer(optimizer, scheduler) -> bool:
    """optimizer.step(), then scheduler.step() unless the fp16 grad scaler skipped the step (inf/nan
    gradients): a skipped step must not advance the learning-rate schedule. Returns whether it stepped."""
    optimizer.step()
    skipped = bool(getattr(optimizer, "step_was_skipped", False))  # accelerate's AcceleratedOptimizer
    if not skipped:
        scheduler.step()
    return not skipped


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
