"""Kernels behind BiMamba: the selective scan and the depthwise causal convolution.

Each op dispatches to the CUDA kernel of ``mamba_ssm`` / ``causal_conv1d`` when that package
imports and the tensors are on CUDA, and to a PyTorch implementation otherwise. The choice can
be forced with ``backend=`` or the environment variables ``MUSE_PYRAMID_SCAN_BACKEND`` /
``MUSE_PYRAMID_CONV_BACKEND``, and queried with :func:`scan_backend` / :func:`conv_backend`.
See ``docs/kernels.md``.
"""

from .causal_conv1d import CONV_BACKEND_ENV, CONV_BACKENDS, causal_conv1d, causal_conv1d_ref, conv_backend
from .selective_scan import SCAN_BACKEND_ENV, SCAN_BACKENDS, scan_backend, selective_scan, selective_scan_ref

__all__ = [
    "selective_scan",
    "selective_scan_ref",
    "scan_backend",
    "SCAN_BACKENDS",
    "SCAN_BACKEND_ENV",
    "causal_conv1d",
    "causal_conv1d_ref",
    "conv_backend",
    "CONV_BACKENDS",
    "CONV_BACKEND_ENV",
]
