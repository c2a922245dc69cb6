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

__all__ = ["AUTO", "requested_backend", "check_cuda_usable", "cuda_kernel", "as_device"]

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


def _check_name(backend: str, valid: tuple, source: str) -> str:
    """Normalise ``backend`` and raise a ValueError naming ``source`` when it is unknown."""
    name = backend.strip().lower()
    if name not in valid and name != AUTO:
        raise ValueError(f"{source} got {backend!r}, expected one of {(AUTO,) + tuple(valid)}")
    return name


def requested_backend(backend: str | None, valid: tuple, env_var: str, op: str) -> str:
    """The backend asked for: the argument, else environment variable ``env_var``, else AUTO."""
    if backend is not None and backend.strip().lower() != AUTO:
        return _check_name(backend, valid, f"{op}: argument `backend`")
    forced = os.environ.get(env_var, "").strip()
    return AUTO if forced.lower() in ("", AUTO) else _check_name(forced, valid, f"${env_var}")


def check_cuda_usable(kernel: Any | None, package: str, device: torch.device, op: str) -> None:
    """Raise a RuntimeError saying why a forced "cuda" backend cannot run."""
    if kernel is None:
        raise RuntimeError(
            f"{op} backend 'cuda' needs the {package} CUDA kernel, which could not be imported; "
            f"install it with `{CUDA_INSTALL_HINT}` or use backend='torch'"
        )
    if device.type != "cuda":
        raise RuntimeError(f"{op} backend 'cuda' needs CUDA tensors, got tensors on {device}")


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
