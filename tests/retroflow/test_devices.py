"""Precision per device class (mocked GPUs) and the grad-scaler rule for the LR schedule."""

from __future__ import annotations

import pytest
import torch

from retroflow import devices
from retroflow.devices import pick_dtype, step_optimizer


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
    ids=["V100", "T4", "A100", "H100"],
)
def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what emulating GPUs report
    assert pick_dtype(torch.device("cuda"), "auto") == expected


def test_explicit_precision_and_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert pick_dtype(torch.device("cuda"), "bf16") == torch.bfloat16
    assert pick_dtype(torch.device("cuda"), "fp16") == torch.float16
    assert pick_dtype(torch.device("cuda"), "fp32") == torch.float32


def _cpu_bf16(monkeypatch, native: bool):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)


def test_auto_on_a_cpu_is_bf16_exactly_where_the_cpu_computes_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    _cpu_bf16(monkeypatch, True)
    assert pick_dtype(cpu, "auto") == torch.bfloat16 and devices.resolve_precision("cpu") == "bf16"
    _cpu_bf16(monkeypatch, False)
    assert pick_dtype(cpu, "auto") == torch.float32 and devices.resolve_precision("cpu") == "fp32"


def test_explicit_precisions_on_a_cpu_are_honoured_or_refused(monkeypatch):
    cpu = torch.device("cpu")
    _cpu_bf16(monkeypatch, True)
    assert pick_dtype(cpu, "bf16") == torch.bfloat16
    assert pick_dtype(cpu, "fp32") == torch.float32
    with pytest.raises(ValueError, match="'fp16' is not supported on cpu"):
        pick_dtype(cpu, "fp16")
    _cpu_bf16(monkeypatch, False)
    with pytest.raises(ValueError, match="no native bf16"):
        pick_dtype(cpu, "bf16")
    assert pick_dtype(cpu, "fp32") == torch.float32


def test_the_probe_asks_torch(monkeypatch):
    devices.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    try:
        assert devices.cpu_has_native_bf16() is False
    finally:
        devices.cpu_has_native_bf16.cache_clear()


class _Counting:
    def __init__(self, skipped: bool | None = None):
        self.steps = 0
        if skipped is not None:
            self.step_was_skipped = skipped

    def step(self):
        self.steps += 1


def test_a_step_the_grad_scaler_skips_does_not_advance_the_schedule():
    optimizer, scheduler = _Counting(skipped=True), _Counting()
    assert step_optimizer(optimizer, scheduler) is False
    assert (optimizer.steps, scheduler.steps) == (1, 0)
    optimizer.step_was_skipped = False
    assert step_optimizer(optimizer, scheduler) is True and scheduler.steps == 1
    plain = _Counting()  # a plain torch optimizer has no step_was_skipped: always steps the schedule
    assert step_optimizer(plain, scheduler) is True and scheduler.steps == 2


def test_native_bf16_reads_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert devices.has_native_bf16(torch.device("cuda")) is True
