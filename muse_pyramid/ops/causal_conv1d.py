"""Depthwise causal 1-D convolution with the semantics of ``causal_conv1d.causal_conv1d_fn``.

For every batch b, channel d and step t, with ``width = weight.shape[1]``::

    out[b, d, t] = bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]   (x[..., <0] = 0)

followed by ``silu`` when ``activation`` is "silu"/"swish".

Backends: "cuda" (``causal_conv1d``'s kernel, widths 2 to 4) and "torch" (``F.conv1d`` with left
padding, any device). On fp32 CPU tensors the torch backend runs the optional fused CPU kernel
(``_cpu_kernel.py``) instead when it can be built. In file order: input checks, the readable
reference (an explicit sum over the taps), and the dispatching ``causal_conv1d``.
Tests: ``tests/ops/test_causal_conv1d.py``.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from . import _dispatch
from ._cpu_kernel import fused_causal_conv1d, kernel_usable
from ._dispatch import AUTO, CONV_KERNEL, as_device, probe_cuda_kernel

__all__ = ["causal_conv1d", "causal_conv1d_ref", "conv_backend", "CONV_BACKENDS", "CONV_BACKEND_ENV"]

CONV_BACKENDS = ("torch", "cuda")
CONV_BACKEND_ENV = "MUSE_PYRAMID_CONV_BACKEND"
_ACTIVATIONS = (None, "silu", "swish")
# widths the causal-conv1d CUDA kernel is compiled for
_CUDA_WIDTHS = (2, 3, 4)


def _check_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(
                f"causal_conv1d: argument `{name}` must be a torch.Tensor, got {type(t).__name__}"
            )
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: argument `x` has shape {tuple(x.shape)}, expected (batch, dim, L)")
    dim = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(
            f"causal_conv1d: argument `weight` has shape {tuple(weight.shape)}, expected (dim, width) = "
            f"({dim}, width) with width >= 1"
        )
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(
            f"causal_conv1d: argument `bias` has shape {tuple(bias.shape)}, expected (dim,) = ({dim},)"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"causal_conv1d: argument `activation` got {activation!r}, expected one of {_ACTIVATIONS}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(
                f"causal_conv1d: argument `{name}` is on {t.device}, expected the device of `x` ({x.device})"
            )


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise convolution written as a sum over the taps (readable, for checking).

    Args:
        x: input ``(batch, dim, L)``.
        weight: taps ``(dim, width)``; tap ``width - 1`` multiplies the current step.
        bias: ``(dim,)``.
        activation: None, "silu" or "swish" (the same as "silu").

    Returns:
        ``(batch, dim, L)`` in x's dtype.
    """
    _check_inputs(x, weight, bias, activation)
    dtype_in, length = x.dtype, x.shape[-1]
    width = weight.shape[1]
    x = x.to(weight.dtype)
    padded = F.pad(x, (width - 1, 0))
    out = sum(weight[:, k, None] * padded[..., k : k + length] for k in range(width))
    if bias is not None:
        out = out + bias[:, None]
    if activation is not None:
        out = F.silu(out)
    return out.to(dtype_in)


def _conv_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    dtype_in, length = x.dtype, x.shape[-1]
    dim, width = weight.shape
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., :length]
    if activation is not None:
        out = F.silu(out)
    return out.to(dtype_in)


@_dispatch.constant_under_compile
def _resolve(device: torch.device, width: int, backend: str | None) -> str:
    """Backend name for this call (see ``selective_scan._resolve``)."""
    name = _dispatch.requested_backend(backend, CONV_BACKENDS, CONV_BACKEND_ENV, "causal_conv1d")
    cuda_fn, reason = probe_cuda_kernel(*CONV_KERNEL)
    if name == AUTO:
        if device.type == "cuda":
            if cuda_fn is not None and width in _CUDA_WIDTHS:
                return "cuda"
            if cuda_fn is None:
                _dispatch.warn_cuda_fallback("causal_conv1d", reason)
        return "torch"
    if name == "cuda":
        _dispatch.check_cuda_usable(cuda_fn, reason, device, "causal_conv1d")
        if width not in _CUDA_WIDTHS:
            raise RuntimeError(
                f"causal_conv1d backend 'cuda' supports width in {_CUDA_WIDTHS}, got width {width}"
            )
    return name


@_dispatch.constant_under_compile
def _fused_on_cpu(device: torch.device) -> bool:
    """Whether the "torch" backend runs the fused CPU kernel for fp32 tensors here (``_cpu_kernel.py``)."""
    return kernel_usable(device, torch.float32)


def conv_backend(
    tensor_or_device: Union[torch.Tensor, torch.device, str], backend: str | None = None, width: int = 4
) -> str:
    """Name of the backend :func:`causal_conv1d` would use.

    Args:
        tensor_or_device: the ``x`` tensor of a call (its device counts), or its device.
        backend: the ``backend=`` argument the call would get (None/"auto" for automatic).
        width: the kernel width of the call (the CUDA kernel supports 2 to 4).

    Returns:
        One of :data:`CONV_BACKENDS`. Raises RuntimeError when a forced backend is unusable.
    """
    return _resolve(as_device(tensor_or_device), width, backend)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution (left padding ``width - 1``), like ``causal_conv1d_fn``.

    Args:
        x: input ``(batch, dim, L)``.
        weight: taps ``(dim, width)``; tap ``width - 1`` multiplies the current step.
        bias: ``(dim,)``.
        activation: None, "silu" or "swish".
        backend: None/"auto", or one of :data:`CONV_BACKENDS` to force it; the environment
            variable ``MUSE_PYRAMID_CONV_BACKEND`` forces one when the argument is left automatic.

    Returns:
        ``(batch, dim, L)`` in x's dtype.
    """
    _check_inputs(x, weight, bias, activation)
    if _resolve(x.device, weight.shape[1], backend) == "cuda":
        fn, _ = probe_cuda_kernel(*CONV_KERNEL)
        return fn(x, weight, bias, activation=activation)
    fp32 = all(t is None or t.dtype == torch.float32 for t in (x, weight, bias))
    if fp32 and _fused_on_cpu(x.device):
        return fused_causal_conv1d(x, weight, bias, silu=activation is not None)
    return _conv_torch(x, weight, bias, activation)
