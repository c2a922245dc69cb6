"""Selective scan (Mamba's S6 recurrence) with the semantics of ``mamba_ssm``'s ``selective_scan_fn``.

For every batch b, channel d, state n and step t (Gu & Dao, 2023, Alg. 2)::

    delta[b, d, t] <- softplus(delta[b, d, t] + delta_bias[d])        (each part optional)
    h[b, d, n, t]   = exp(delta[b, d, t] * A[d, n]) * h[b, d, n, t-1]
                      + delta[b, d, t] * B[b, g(d), n, t] * u[b, d, t]     (h[..., -1] = 0)
    y[b, d, t]      = sum_n C[b, g(d), n, t] * h[b, d, n, t] + D[d] * u[b, d, t]
    out[b, d, t]    = y[b, d, t] * silu(z[b, d, t])                     (when z is given)

with ``g(d) = d // (dim // G)`` for B/C grouped into G groups (G = 1 for ``(batch, N, L)``).

Backends: "cuda" (``mamba_ssm``'s kernel) and "torch" (chunked, memory-bounded PyTorch for any
device: ``_chunked_scan.py``, with delta_bias/softplus, the D skip and the z gate as ordinary PyTorch
ops around the recurrence). On fp32 CPU tensors the torch backend runs the optional fused CPU kernel
(``_cpu_kernel.py``) instead when it can be built. In file order: input checks, the readable reference
(one step per token), and the dispatching ``selective_scan``.
Shape letters: batch, dim (channels), L (sequence), N (state), G (groups).
Tests: ``tests/ops/test_selective_scan.py``.
"""

from __future__ import annotations

import contextlib
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange

from ._chunked_scan import chunked_scan
from ._cpu_kernel import fused_selective_scan, kernel_usable
from ._dispatch import (
    AUTO,
    SCAN_KERNEL,
    as_device,
    check_cuda_usable,
    constant_under_compile,
    probe_cuda_kernel,
    requested_backend,
    warn_cuda_fallback,
)

__all__ = ["selective_scan", "selective_scan_ref", "scan_backend", "SCAN_BACKENDS", "SCAN_BACKEND_ENV"]

SCAN_BACKENDS = ("torch", "cuda")
SCAN_BACKEND_ENV = "MUSE_PYRAMID_SCAN_BACKEND"

ScanOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# input checks


def _shape_error(name: str, got: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"selective_scan: argument `{name}` has shape {tuple(got.shape)}, expected {expected}")


def _check_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> Tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; return (batch, dim, L, N)."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(
                f"selective_scan: argument `{name}` must be a torch.Tensor, got {type(t).__name__}"
            )
    if u.dim() != 3:
        raise _shape_error("u", u, "(batch, dim, L)")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise _shape_error("A", A, f"(dim, N) = ({dim}, N)")
    if A.is_complex():
        raise TypeError(f"selective_scan: argument `A` must be real, got dtype {A.dtype}")
    n_state = A.shape[1]
    for name in ("delta", "z"):
        t = named[name]
        if t is not None and t.shape != u.shape:
            raise _shape_error(name, t, f"(batch, dim, L) = {tuple(u.shape)} like `u`")
    for name in ("B", "C"):
        t = named[name]
        ok3 = t.dim() == 3 and tuple(t.shape) == (batch, n_state, length)
        ok4 = t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == (n_state, length) and t.shape[1] > 0
        if not (ok3 or (ok4 and dim % t.shape[1] == 0)):
            raise _shape_error(
                name,
                t,
                f"(batch, N, L) = ({batch}, {n_state}, {length}) or (batch, G, N, L) = "
                f"({batch}, G, {n_state}, {length}) with dim={dim} divisible by G",
            )
    for name in ("D", "delta_bias"):
        t = named[name]
        if t is not None and tuple(t.shape) != (dim,):
            raise _shape_error(name, t, f"(dim,) = ({dim},)")
    for name, t in named.items():
        if t is not None and t.device != u.device:
            raise ValueError(
                f"selective_scan: argument `{name}` is on {t.device}, expected the device of `u` ({u.device})"
            )
        if t is not None and not t.is_floating_point():
            raise TypeError(
                f"selective_scan: argument `{name}` must be a floating tensor, got dtype {t.dtype}"
            )
    return batch, dim, length, n_state


def _as_groups(BC: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, G, N, L)."""
    return BC.unsqueeze(1) if BC.dim() == 3 else BC


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast so the scan state and its arithmetic stay in fp32 (or fp64)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        return contextlib.nullcontext()


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp64 inputs are computed in fp64, everything else (fp32, bf16, fp16) in fp32."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _final_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """softplus(delta + delta_bias[:, None]), each part optional; delta (batch, dim, L)."""
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    return F.softplus(delta) if softplus else delta


def _skip_and_gate(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> torch.Tensor:
    """(y + D[:, None] * u) * silu(z), each part optional; y, u, z (batch, dim, L)."""
    if D is not None:
        y = torch.addcmul(y, u, D.to(y.dtype)[:, None])
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


# --------------------------------------------------------------------------------------------
# readable reference: one step per token, state (batch, dim, N), autograd through the loop


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanOutput:
    """Selective scan written as the plain recurrence, one step per token.

    Same arguments and result as :func:`selective_scan`. Readable and exact, but autograd keeps
    every step's state, so memory grows with ``batch * dim * L * N``; use it for checking and
    short sequences only.

    Args:
        u: input ``(batch, dim, L)``.
        delta: step sizes ``(batch, dim, L)``.
        A: state matrix ``(dim, N)``, real (negative for a stable scan).
        B: input projection ``(batch, N, L)`` or grouped ``(batch, G, N, L)``.
        C: output projection ``(batch, N, L)`` or grouped ``(batch, G, N, L)``.
        D: skip ``(dim,)``.
        z: gate ``(batch, dim, L)``; the output is multiplied by ``silu(z)``.
        delta_bias: added to delta ``(dim,)`` before the optional softplus.
        delta_softplus: apply softplus to delta.
        return_last_state: also return the final state ``(batch, dim, N)`` (fp32 or fp64).

    Returns:
        ``out (batch, dim, L)`` in u's dtype, or ``(out, last_state (batch, dim, N))``.
    """
    batch, dim, length, n_state = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, dtype = u.dtype, _compute_dtype(u)
    with _no_autocast(u.device):
        u, delta = u.to(dtype), _final_delta(delta.to(dtype), delta_bias, delta_softplus)
        # channels split into G groups of H; B/C broadcast over H instead of being repeated
        B, C = _as_groups(B).to(dtype), _as_groups(C).to(dtype)
        groups = B.shape[1]
        A_g = rearrange(A.to(dtype), "(g h) n -> g h n", g=groups)
        du = rearrange(delta * u, "b (g h) l -> b g h l", g=groups)
        delta_g = rearrange(delta, "b (g h) l -> b g h l", g=groups)
        h = u.new_zeros(batch, groups, dim // groups, n_state)
        ys = []
        for d_t, du_t, B_t, C_t in zip(delta_g.unbind(-1), du.unbind(-1), B.unbind(-1), C.unbind(-1)):
            decay = torch.exp(d_t[..., None] * A_g)  # (batch, G, H, N)
            h = torch.addcmul(du_t[..., None] * B_t[:, :, None, :], decay, h)
            ys.append((h * C_t[:, :, None, :]).sum(-1))
        y = rearrange(torch.stack(ys, dim=-1), "b g h l -> b (g h) l")
        out = _skip_and_gate(y, u, D, z).to(dtype_in)
    if return_last_state:
        return out, rearrange(h, "b g h n -> b (g h) n")
    return out


# --------------------------------------------------------------------------------------------
# dispatch


@constant_under_compile
def _resolve(device: torch.device, backend: str | None) -> str:
    """Name of the backend that runs tensors of ``device``; raises when forced and unusable."""
    name = requested_backend(backend, SCAN_BACKENDS, SCAN_BACKEND_ENV, "selective_scan")
    cuda_fn, reason = probe_cuda_kernel(*SCAN_KERNEL)
    if name == AUTO:
        if device.type == "cuda":
            if cuda_fn is not None:
                return "cuda"
            warn_cuda_fallback("selective_scan", reason)
        return "torch"
    if name == "cuda":
        check_cuda_usable(cuda_fn, reason, device, "selective_scan")
    return name


@constant_under_compile
def _fused_on_cpu(device: torch.device, dtype: torch.dtype, n_state: int) -> bool:
    """Whether the "torch" backend runs the fused CPU kernel here (``_cpu_kernel.py``)."""
    return kernel_usable(device, dtype, n_state)


def scan_backend(tensor_or_device: Union[torch.Tensor, torch.device, str], backend: str | None = None) -> str:
    """Name of the backend :func:`selective_scan` would use for ``tensor_or_device``.

    Args:
        tensor_or_device: the ``u`` tensor of a call (its device counts), or a device.
        backend: the ``backend=`` argument the call would get (None/"auto" for automatic).

    Returns:
        One of :data:`SCAN_BACKENDS`. Raises RuntimeError when a forced backend is unusable.
    """
    return _resolve(as_device(tensor_or_device), backend)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str | None = None,
) -> ScanOutput:
    """Selective scan with the semantics of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    The state is accumulated in fp32 (fp64 for fp64 inputs), also under autocast.

    Args:
        u: input ``(batch, dim, L)``.
        delta: step sizes ``(batch, dim, L)``.
        A: state matrix ``(dim, N)``, real.
        B: input projection ``(batch, N, L)`` or grouped ``(batch, G, N, L)`` (dim divisible by G).
        C: output projection ``(batch, N, L)`` or grouped ``(batch, G, N, L)``.
        D: skip ``(dim,)``.
        z: gate ``(batch, dim, L)``; the output is multiplied by ``silu(z)``.
        delta_bias: added to delta ``(dim,)`` before the optional softplus.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state ``(batch, dim, N)``.
        backend: None/"auto", or one of :data:`SCAN_BACKENDS` to force it; the environment
            variable ``MUSE_PYRAMID_SCAN_BACKEND`` forces one when the argument is left automatic.

    Returns:
        ``out (batch, dim, L)`` in u's dtype, or ``(out, last_state (batch, dim, N))``.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if _resolve(u.device, backend) == "cuda":
        fn, _ = probe_cuda_kernel(*SCAN_KERNEL)
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    dtype_in, dtype = u.dtype, _compute_dtype(u)
    with _no_autocast(u.device):
        if _fused_on_cpu(u.device, dtype, A.shape[-1]):
            out, last_state = fused_selective_scan(
                *(t.to(dtype) for t in (u, delta, A, _as_groups(B), _as_groups(C))),
                *(None if t is None else t.to(dtype) for t in (D, z, delta_bias)),
                delta_softplus,
            )
        else:
            u = u.to(dtype)
            delta = _final_delta(delta.to(dtype), delta_bias, delta_softplus)
            y, last_state = chunked_scan(u, delta, A.to(dtype), _as_groups(B).to(dtype), _as_groups(C).to(dtype))
            out = _skip_and_gate(y, u, D, z)
    return (out.to(dtype_in), last_state) if return_last_state else out.to(dtype_in)
