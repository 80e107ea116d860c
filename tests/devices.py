"""The devices the kernel tests run on (the CPU, plus CUDA when present) and, per
op, the (device, backend) pairs derived from its dispatcher: every backend that can
run on that device right now. On a GPU machine the same oracle tests thus run the
Triton and CUDA backends; on the CPU, Triton runs only through the interpreter
(tests/triton_harness.py)."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_backends(dispatcher, devices=DEVICES):
    """pytest params (device, backend) for every backend of ``dispatcher`` that runs on each device."""
    return [pytest.param(dev, name, id=f"{dev}-{name}")
            for dev in devices for name, b in dispatcher.backends.items() if not b.not_supported_reasons(dev)]


def backends_on(dispatcher, device: str):
    return [name for name, b in dispatcher.backends.items() if not b.not_supported_reasons(device)]
