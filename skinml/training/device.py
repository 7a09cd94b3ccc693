"""Where and how tensors run: device choice, seeding, mixed precision, synchronisation."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto`: the first of CUDA, MPS and CPU that this machine has."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """Autocast context factory and gradient scaler for `runtime.amp`.

    Both exist in every mode, doing nothing when off, so the training step has one path:
    a null context for fp32, and a GradScaler that is enabled only for fp16.
    """

    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler
    name: str  # off, bf16 or fp16: what `auto` resolved to


def precision_for(device: torch.device, amp: str) -> Precision:
    if amp == "auto":
        amp = "off" if device.type != "cuda" else (
            "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if amp == "off":
        return Precision(contextlib.nullcontext, scaler, amp)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return Precision(lambda: torch.autocast(device.type, dtype=dtype), scaler, amp)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures work done rather than work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
