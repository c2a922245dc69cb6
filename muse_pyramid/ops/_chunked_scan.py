"""Memory-bounded selective scan in pure PyTorch (any device): chunked, with a recomputing backward.

The sequence is cut into chunks of T steps. Within a chunk every per-step quantity is built
with one large tensor op ``(T, batch, G, H, N)``: the decays ``exp(delta * A)`` and inputs
``delta * u * B``; only the state update ``h = x_t + a_t * h`` runs step by step (one fused
``addcmul`` per token), and the outputs ``<C_t, h_t>`` are one batched matmul per chunk.
The forward keeps only the state at each chunk start; the backward recomputes one chunk at a
time and runs the adjoint recurrence ``g_t = dy_t C_t + a_{t+1} g_{t+1}`` backwards through it.
Peak memory is O((L / T + T) * batch * dim * N) with T ~ sqrt(L), instead of L * batch * dim * N
for autograd through a step loop. Only decays ``a <= 1`` are ever multiplied; nothing divides
by a cumulative decay, so the scan cannot overflow (delta up to 10, A down to -100, any L).

Shape letters: batch, G (B/C groups), H = dim / G (channels per group), L, T (chunk), N.
Tests: ``tests/ops/test_selective_scan.py``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

__all__ = ["chunked_scan", "default_chunk_size"]


def default_chunk_size(length: int) -> int:
    """Chunk length ~sqrt(L), which balances saved chunk-start states against chunk workspace."""
    return max(16, min(256, math.isqrt(max(length, 1))))


def _chunk_terms(delta_c, u_c, A_g, B_c):
    """Decays a_t = exp(delta_t A) and inputs x_t = delta_t u_t B_t, both (T, batch, G, H, N)."""
    a = torch.exp(delta_c[..., None] * A_g)
    x = (delta_c * u_c)[..., None] * B_c[:, :, :, None, :]
    return a, x


def _chunk_states(a, x, h0):
    """States h_t = x_t + a_t * h_{t-1} of one chunk, (T, batch, G, H, N), from h0 (batch, G, H, N)."""
    hs = torch.empty_like(x)
    h = h0
    for i in range(x.shape[0]):
        h = torch.addcmul(x[i], a[i], h, out=hs[i])
    return hs


def _spans(length: int, chunk: int) -> list:
    return [(t0, min(t0 + chunk, length)) for t0 in range(0, length, chunk)]


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):  # noqa: ANN001 - autograd signature
        groups = B.shape[1]
        # time-major layouts, so that one step is a contiguous (batch, G, H[, N]) slice
        u_t = rearrange(u, "b (g h) l -> l b g h", g=groups).contiguous()
        delta_t = rearrange(delta, "b (g h) l -> l b g h", g=groups).contiguous()
        B_t = rearrange(B, "b g l n -> l b g n").contiguous()
        C_t = rearrange(C, "b g l n -> l b g n").contiguous()
        A_g = rearrange(A, "(g h) n -> g h n", g=groups)
        spans = _spans(u.shape[-1], chunk)
        h = u.new_zeros(*u_t.shape[1:], A.shape[-1])
        starts = u.new_empty(len(spans), *h.shape)
        y_t = torch.empty_like(u_t)
        for k, (t0, t1) in enumerate(spans):
            starts[k] = h
            hs = _chunk_states(*_chunk_terms(delta_t[t0:t1], u_t[t0:t1], A_g, B_t[t0:t1]), h)
            h = hs[-1]
            y_t[t0:t1] = torch.einsum("tbghn,tbgn->tbgh", hs, C_t[t0:t1])
        ctx.save_for_backward(u_t, delta_t, A_g, B_t, C_t, starts)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        y = rearrange(y_t, "l b g h -> b (g h) l").contiguous()
        return y, rearrange(h.clone(), "b g h n -> b (g h) n")

    @staticmethod
    def backward(ctx, dy, dlast):  # noqa: ANN001 - autograd signature
        u_t, delta_t, A_g, B_t, C_t, starts = ctx.saved_tensors
        groups = A_g.shape[0]
        if dy is None:
            dy_t = torch.zeros_like(u_t)
        else:
            dy_t = rearrange(dy.to(u_t.dtype), "b (g h) l -> l b g h", g=groups).contiguous()
        g = (
            torch.zeros_like(starts[0])
            if dlast is None
            else rearrange(dlast.to(u_t.dtype), "b (g h) n -> b g h n", g=groups)
        )
        du_t, ddelta_t = torch.empty_like(u_t), torch.empty_like(u_t)
        dB_t, dC_t = torch.empty_like(B_t), torch.empty_like(C_t)
        dA_g = torch.zeros_like(A_g)
        for k, (t0, t1) in reversed(list(enumerate(_spans(u_t.shape[0], ctx.chunk)))):
            delta_c, u_c, B_c, dy_c = delta_t[t0:t1], u_t[t0:t1], B_t[t0:t1], dy_t[t0:t1]
            a, x = _chunk_terms(delta_c, u_c, A_g, B_c)
            hs = _chunk_states(a, x, starts[k])
            # adjoint gs[i] = dL/dh_t = dy_t C_t + a_{t+1} gs[i+1]; g enters as a_{t1} * dL/dh_{t1}
            gs = dy_c[..., None] * C_t[t0:t1, :, :, None, :]
            gs[-1] += g
            for i in reversed(range(t1 - t0 - 1)):
                torch.addcmul(gs[i], a[i + 1], gs[i + 1], out=gs[i])
            g = gs[0] * a[0]
            dC_t[t0:t1] = torch.einsum("tbgh,tbghn->tbgn", dy_c, hs)
            dB_t[t0:t1] = torch.einsum("tbgh,tbghn->tbgn", delta_c * u_c, gs)
            g_dot_B = torch.einsum("tbghn,tbgn->tbgh", gs, B_c)  # dL/d(delta_t u_t)
            # w = dL/d(delta_t A) = g_t * a_t * h_{t-1}
            w = gs * a
            w[1:] *= hs[:-1]
            w[0] *= starts[k]
            du_t[t0:t1] = g_dot_B * delta_c
            ddelta_t[t0:t1] = g_dot_B * u_c + torch.einsum("tbghn,ghn->tbgh", w, A_g)
            dA_g += torch.einsum("tbghn,tbgh->ghn", w, delta_c)
        return (
            rearrange(du_t, "l b g h -> b (g h) l"),
            rearrange(ddelta_t, "l b g h -> b (g h) l"),
            rearrange(dA_g, "g h n -> (g h) n"),
            rearrange(dB_t, "l b g n -> b g l n"),
            rearrange(dC_t, "l b g n -> b g l n"),
            None,
        )


def chunked_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrence only, chunked; all inputs share one floating dtype (fp32 or fp64).

    Args:
        u: ``(batch, dim, L)``.
        delta: final step sizes ``(batch, dim, L)`` (bias and softplus already applied).
        A: ``(dim, N)``.
        B: ``(batch, G, L, N)`` (time before state).
        C: ``(batch, G, L, N)``.
        chunk_size: steps per chunk (default :func:`default_chunk_size`).

    Returns:
        ``y (batch, dim, L)`` with ``y_t = <C_t, h_t>`` and ``last_state (batch, dim, N)``.
    """
    chunk = default_chunk_size(u.shape[-1]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunked_scan: argument `chunk_size` got {chunk_size}, expected a positive integer")
    return _ChunkedScan.apply(u, delta, A, B, C, chunk)
