"""Optional fused CPU kernels of the "torch" backends: the selective scan (``csrc/selective_scan_cpu.cpp``)
and the causal depthwise convolution (``csrc/causal_conv1d_cpu.cpp``).

The portable scan (``_chunked_scan.py``) runs op by op, which suits a GPU and not a CPU: each op is a
pass over state-sized ``(steps, batch, dim, N)`` tensors, so on a CPU the scan is bound by memory
traffic, and softplus, the D skip and the z gate add passes of their own. The scan kernel computes the
whole ``selective_scan`` (delta_bias and softplus, the recurrence, D and the gate; forward, and a
backward that recomputes the states block by block) with one channel's state in registers, as
mamba-ssm's CUDA kernel does on a GPU. The convolution kernel does for ``causal_conv1d`` what
causal-conv1d's does: the taps and the SiLU in one pass, reading a channel slice in place, with no
padded copies (``F.conv1d`` pads its output and, backwards, zero-fills a padded gradient). They are
accelerators, not dependencies:

- built together on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``; about
  15 s on 2 cores, once per machine: PyTorch caches the build under ``$TORCH_EXTENSIONS_DIR``);
- ``torch.library`` ops, ``muse_pyramid_cpu::scan_fwd`` / ``scan_bwd`` and ``conv_fwd`` / ``conv_bwd``,
  with fake implementations and autograd registered here, so autograd and ``torch.compile`` see one
  op each;
- threaded with ``at::parallel_for``: PyTorch's own intra-op threads (``torch.set_num_threads``
  applies; no second thread pool);
- fp32 CPU tensors only, and N = 16 states for the scan (MUSE's and Mamba's d_state). Everything else,
  and every machine where they cannot be built, runs the portable path, with one INFO log saying why.
  ``MUSE_PYRAMID_CPU_KERNEL=0`` turns both off.

Tests: ``tests/ops/test_cpu_kernel.py``, and every test of ``tests/ops/test_selective_scan.py`` and
``tests/ops/test_causal_conv1d.py`` with the kernels on and off.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from einops import rearrange

__all__ = ["CPU_KERNEL_ENV", "kernel_usable", "fused_selective_scan", "fused_causal_conv1d"]

_logger = logging.getLogger("muse_pyramid.ops")

CPU_KERNEL_ENV = "MUSE_PYRAMID_CPU_KERNEL"
_SOURCES = tuple(Path(__file__).resolve().parent / "csrc" / name
                 for name in ("selective_scan_cpu.cpp", "causal_conv1d_cpu.cpp"))


def _isa() -> str:
    """"avx2" where PyTorch reads AVX2 (or AVX-512) on this CPU, else "default": the kernel's vectors
    are 8 floats wide, and the build's name carries it, so that machines sharing an extensions folder
    do not load each other's builds."""
    reader = getattr(torch.backends.cpu, "get_cpu_capability", None)
    capability = reader().lower() if reader is not None else "default"
    return "avx2" if capability in ("avx2", "avx512") else "default"


# the kernel keeps one channel's state in one SIMD value of this many floats
KERNEL_STATES = 16
# steps per block of the backward's recomputation: a task's buffers hold 2 * BLOCK * N floats
BLOCK = 512


@functools.cache
def _build() -> Tuple[Optional[Any], str]:
    """``(torch.ops.muse_pyramid_cpu, "")`` once built, loaded and registered, else ``(None, reason)``.
    Cached per process."""
    if not hasattr(torch.library, "register_autograd"):
        return None, f"torch {torch.__version__} has no torch.library.register_autograd (needs 2.4 or newer)"
    try:
        extension_logger = logging.getLogger("torch.utils.cpp_extension")
        level = extension_logger.level
        extension_logger.setLevel(logging.ERROR)  # a CUDA build of torch on a machine without CUDA warns
        try:
            from torch.utils import cpp_extension
        finally:
            extension_logger.setLevel(level)
        if not cpp_extension.is_ninja_available():
            return None, "ninja is not installed (pip install ninja)"
        isa = _isa()
        _logger.info("muse_pyramid: building the fused CPU kernels (%s; once per machine)", isa)
        cpp_extension.load(
            name=f"muse_pyramid_cpu_{isa}",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-fopenmp", *(["-mavx2", "-mfma"] if isa == "avx2" else [])],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - no compiler, a failed build: the portable path runs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"it could not be built ({type(exc).__name__}: {first[:300]})"
    _register()
    return torch.ops.muse_pyramid_cpu, ""


@functools.cache
def _register() -> None:
    """Fake implementations and autograd of the C++ ops (their schemas are in the .cpp files); once per
    process."""

    @torch.library.register_fake("muse_pyramid_cpu::scan_fwd")
    def _fwd_fake(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, steps):  # noqa: ANN001
        blocks = -(-u.shape[-1] // steps)
        n_state = A.shape[-1]
        return u.new_empty(u.shape), u.new_empty(*u.shape[:2], n_state), u.new_empty(blocks, *u.shape[:2], n_state)

    @torch.library.register_fake("muse_pyramid_cpu::scan_bwd")
    def _bwd_fake(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, starts, dout, dlast, steps):  # noqa: ANN001
        dz = u.new_empty(u.shape) if z is not None else u.new_empty(0)
        dim = u.shape[1]
        return (u.new_empty(u.shape), u.new_empty(u.shape), A.new_empty(A.shape), Bt.new_empty(Bt.shape),
                Ct.new_empty(Ct.shape), u.new_empty(dim), dz, u.new_empty(dim))

    def _setup_context(ctx, inputs, output):  # noqa: ANN001
        u, delta, A, Bt, Ct, D, z, delta_bias, softplus, steps = inputs
        ctx.save_for_backward(u, delta, A, Bt, Ct, D, z, delta_bias, output[2])
        ctx.softplus, ctx.steps = softplus, steps

    def _backward(ctx, dout, dlast, _dstarts):  # noqa: ANN001
        u, delta, A, Bt, Ct, D, z, delta_bias, starts = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = u.new_zeros(*u.shape[:2], A.shape[-1]) if dlast is None else dlast.contiguous()
        du, ddelta, dA, dBt, dCt, dD, dz, dbias = torch.ops.muse_pyramid_cpu.scan_bwd(
            u, delta, A, Bt, Ct, D, z, delta_bias, ctx.softplus, starts, dout, dlast, ctx.steps
        )
        return (du, ddelta, dA, dBt, dCt, dD if D is not None else None, dz if z is not None else None,
                dbias if delta_bias is not None else None, None, None)

    torch.library.register_autograd("muse_pyramid_cpu::scan_fwd", _backward, setup_context=_setup_context)

    @torch.library.register_fake("muse_pyramid_cpu::conv_fwd")
    def _conv_fwd_fake(x, weight, bias, silu):  # noqa: ANN001
        return x.new_empty(x.shape)

    @torch.library.register_fake("muse_pyramid_cpu::conv_bwd")
    def _conv_bwd_fake(x, weight, bias, silu, dout):  # noqa: ANN001
        return x.new_empty(x.shape), weight.new_empty(weight.shape), x.new_empty(x.shape[1] if bias is not None else 0)

    def _conv_setup_context(ctx, inputs, output):  # noqa: ANN001
        x, weight, bias, silu = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu

    def _conv_backward(ctx, dout):  # noqa: ANN001
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.muse_pyramid_cpu.conv_bwd(x, weight, bias, ctx.silu, dout.contiguous())
        return dx, dweight, dbias if bias is not None else None, None

    torch.library.register_autograd("muse_pyramid_cpu::conv_fwd", _conv_backward, setup_context=_conv_setup_context)


@functools.cache
def _log_unavailable(reason: str) -> None:
    _logger.info(
        "selective_scan, causal_conv1d: fp32 CPU tensors run on the op-by-op PyTorch path because %s", reason
    )


def kernel_usable(device: torch.device, dtype: torch.dtype, n_state: Optional[int] = None) -> bool:
    """True when the fused kernels run on ``device`` in compute ``dtype``: fp32 on the CPU, not turned
    off by ``MUSE_PYRAMID_CPU_KERNEL=0``, and built (the first call builds them). ``n_state``: the
    scan's state size, which must be 16 (Mamba's and MUSE's d_state); None for the convolution."""
    if device.type != "cpu" or dtype != torch.float32 or n_state not in (None, KERNEL_STATES):
        return False
    if os.environ.get(CPU_KERNEL_ENV, "").strip().lower() in ("0", "false", "off", "no"):
        return False
    ops, reason = _build()
    if ops is None:
        _log_unavailable(reason)
    return ops is not None


def fused_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole selective scan in the kernel (only after :func:`kernel_usable` said yes).

    Args:
        u, delta, z: ``(batch, dim, L)`` fp32 (z may be None).
        A: ``(dim, N)``; D, delta_bias: ``(dim,)`` or None.
        B, C: ``(batch, G, N, L)``.
        delta_softplus: apply softplus to ``delta + delta_bias``.

    Returns:
        ``out (batch, dim, L)`` and ``last_state (batch, dim, N)``.
    """
    def contiguous(t):  # noqa: ANN001, ANN202
        return None if t is None else t.contiguous()

    out, last, _ = torch.ops.muse_pyramid_cpu.scan_fwd(
        u.contiguous(), delta.contiguous(), A.contiguous(),
        rearrange(B, "b g n l -> b g l n").contiguous(), rearrange(C, "b g n l -> b g l n").contiguous(),
        contiguous(D), contiguous(z), contiguous(delta_bias), delta_softplus, BLOCK,
    )
    return out, last


def fused_causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool
) -> torch.Tensor:
    """Depthwise causal convolution in the kernel (only after :func:`kernel_usable` said yes).

    Args:
        x: ``(batch, dim, L)`` fp32; a channel slice of a larger tensor is read in place when its time
            stride is 1.
        weight: ``(dim, width)`` fp32; tap ``width - 1`` multiplies the current step.
        bias: ``(dim,)`` fp32 or None.
        silu: apply SiLU to the output.

    Returns:
        ``(batch, dim, L)`` contiguous.
    """
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return torch.ops.muse_pyramid_cpu.conv_fwd(x, weight.contiguous(), None if bias is None else bias.contiguous(), silu)
