"""Seeding and mixed precision: the run-time settings that training, evaluation and the cache share."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

__all__ = ["autocast_context", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(precision: str, device: torch.device):
    """`torch.autocast` for bf16 / fp16 on CUDA; fp32 (or any CPU run) is a no-op context."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"--precision {precision} (AMP) needs a CUDA device; got device {device}. Use fp32 on CPU")
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
