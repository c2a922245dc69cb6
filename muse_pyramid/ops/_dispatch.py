"""Backend resolution shared by the selective scan and the causal convolution.

A backend is chosen, in order of precedence, by the ``backend=`` argument, then by an
environment variable (``MUSE_PYRAMID_SCAN_BACKEND`` / ``MUSE_PYRAMID_CONV_BACKEND``), then
automatically. The optional CUDA packages are imported lazily and only once per process.

Tests: ``tests/ops/test_selective_scan.py``, ``tests/ops/test_causal_conv1d.py``.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Union

import torch

__all__ = ["AUTO", "env_backend", "cuda_kernel", "check_backend_name", "as_device"]

AUTO = "auto"

CUDA_INSTALL_HINT = "pip install muse-pyramid[cuda]"


@functools.cache
def cuda_kernel(module: str, name: str) -> Any | None:
    """Import ``module.name`` if possible, else return None (result cached per process).

    Importing ``mamba_ssm`` can fail with errors other than ImportError (a wheel built for
    another CUDA raises OSError on its shared library), so any exception means "absent".
    """
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - any failure means the kernel is unusable here
        return None


def env_backend(var: str) -> str | None:
    """The backend named by environment variable ``var``, or None when unset/empty/"auto"."""
    value = os.environ.get(var, "").strip().lower()
    return None if value in ("", AUTO) else value


def check_backend_name(backend: str, valid: tuple, source: str) -> str:
    """Normalise ``backend`` and raise a ValueError naming ``source`` when it is unknown."""
    name = backend.strip().lower()
    if name not in valid and name != AUTO:
        raise ValueError(f"{source} got {backend!r}, expected one of {(AUTO,) + tuple(valid)}")
    return name


def as_device(tensor_or_device: Union[torch.Tensor, torch.device, str]) -> torch.device:
    """The device of a tensor, or the device named by a string/torch.device."""
    if isinstance(tensor_or_device, torch.Tensor):
        return tensor_or_device.device
    if isinstance(tensor_or_device, (str, torch.device)):
        return torch.device(tensor_or_device)
    raise TypeError(
        f"tensor_or_device got {type(tensor_or_device).__name__}, expected a torch.Tensor, "
        "a torch.device or a device string"
    )
