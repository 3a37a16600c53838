"""Device and precision choice in one place: CUDA + bf16 (or fp16) when present; on a CPU, bf16
autocast where the processor computes bf16 natively (AVX-512 BF16 or AMX), fp32 elsewhere."""

from __future__ import annotations

import functools
import os
import random
from contextlib import nullcontext

import numpy as np
import torch

PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


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


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (AVX-512 BF16 or AMX). Asked of torch, not
    read from the model name: without native support bf16 is emulated and slower than fp32."""
    probe = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # a torch built without oneDNN
        return False


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The autocast dtype for `precision` on `device` (weights stay fp32: training keeps fp32 masters).

    'auto': bf16 on Ampere and newer GPUs, fp16 (trained with a grad scaler) on older ones, bf16 on a
    CPU with native bf16, fp32 on any other CPU. An explicit 'bf16' on a CPU without native bf16 and
    'fp16' on a CPU are refused: they would run emulated, slower and less accurate than fp32.
    """
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        if precision == "bf16" or has_native_bf16(device):
            return torch.bfloat16
        return torch.float16
    if precision == "fp16":
        raise ValueError(f"precision 'fp16' is not supported on {device.type}: use 'bf16' where the CPU has it, 'auto' or 'fp32'")
    native = device.type == "cpu" and cpu_has_native_bf16()
    if precision == "bf16" and not native:
        raise ValueError(
            f"precision 'bf16' requested, but this {device.type} has no native bf16 (AVX-512 BF16 or AMX): use 'auto' (fp32 here) or 'fp32'"
        )
    return torch.bfloat16 if native else torch.float32


def resolve_precision(device: str = "auto", precision: str = "auto") -> str:
    """What `precision` on `device` resolves to on this machine, by name ('fp32', 'bf16', 'fp16'):
    the value an artifact's key records, since it changes the numbers a model produces."""
    return PRECISION_NAMES[pick_dtype(pick_device(device), precision)]


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
