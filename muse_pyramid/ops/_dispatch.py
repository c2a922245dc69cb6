"""Backend resolution shared by the selective scan and the causal convolution.

A backend is chosen, in order of precedence, by the ``backend=`` argument, then by an
environment variable (``MUSE_PYRAMID_SCAN_BACKEND`` / ``MUSE_PYRAMID_CONV_BACKEND``), then
automatically. The optional CUDA packages are imported lazily and only once per process.

Tests: ``tests/ops/test_selective_scan.py``, ``tests/ops/test_causal_conv1d.py``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, Optional, Tuple, Union

import torch

__all__ = [
    "AUTO", "SCAN_KERNEL", "CONV_KERNEL", "INNER_KERNEL", "requested_backend", "check_cuda_usable",
    "probe_cuda_kernel", "warn_cuda_fallback", "is_compiling", "constant_under_compile", "as_device",
]

_logger = logging.getLogger("muse_pyramid.ops")

AUTO = "auto"

CUDA_INSTALL_HINT = (
    "pip install muse-pyramid[cuda] (mamba-ssm versions that no longer build their CUDA extension by "
    "default need `MAMBA_KEEP_CUDA_BUILD=TRUE pip install mamba-ssm --no-build-isolation`)"
)

# (compiled extensions that must import, Python module, function): the function's wrapper module
# imports even when the extension was never built, and then fails at the first call.
SCAN_KERNEL = (("selective_scan_cuda",), "mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
CONV_KERNEL = (("causal_conv1d_cuda",), "causal_conv1d", "causal_conv1d_fn")
INNER_KERNEL = (
    ("selective_scan_cuda", "causal_conv1d_cuda"), "mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn"
)


def is_compiling() -> bool:
    """True while ``torch.compile`` traces (value checks that would sync with the host are skipped then)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def constant_under_compile(fn):
    """Let ``torch.compile`` run ``fn`` once while tracing and keep its result as a constant (for the
    backend choice: environment, imports and probes are not traceable, and do not change)."""
    compiler = getattr(torch, "compiler", None)
    wrap = getattr(compiler, "assume_constant_result", None)
    return fn if wrap is None else wrap(fn)


@functools.cache
def probe_cuda_kernel(extensions: Tuple[str, ...], module: str, name: str) -> Tuple[Optional[Any], str]:
    """``(module.name, "")`` when the compiled ``extensions`` and the wrapper import, else ``(None, reason)``.

    Cached per process. Importing a CUDA package can fail with errors other than ImportError (a wheel
    built for another CUDA raises OSError on its shared library), so any exception means "absent".
    """
    for ext in extensions:
        try:
            importlib.import_module(ext)
        except Exception as exc:  # noqa: BLE001 - any failure means the kernel is unusable here
            return None, f"its compiled extension `{ext}` does not import ({type(exc).__name__}: {exc})"
    try:
        return getattr(importlib.import_module(module), name), ""
    except Exception as exc:  # noqa: BLE001
        return None, f"`{module}.{name}` does not import ({type(exc).__name__}: {exc})"


@functools.cache
def warn_cuda_fallback(op: str, reason: str) -> None:
    """Log once per process and reason that CUDA tensors take the PyTorch path of ``op``."""
    _logger.warning(
        "%s: CUDA tensors run on the portable PyTorch path, not the CUDA kernel, because %s. "
        "Install the kernels with `%s`.", op, reason, CUDA_INSTALL_HINT,
    )


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


def check_cuda_usable(kernel: Any | None, reason: str, device: torch.device, op: str) -> None:
    """Raise a RuntimeError saying why a forced "cuda" backend cannot run (``reason``: the probe's)."""
    if kernel is None:
        raise RuntimeError(
            f"{op} backend 'cuda' cannot run because {reason}; install the kernels with "
            f"`{CUDA_INSTALL_HINT}` or use backend='torch'"
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
