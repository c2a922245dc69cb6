"""Selective scan in pure PyTorch for any device: blocks of chunks, few ops, a recomputing backward.

The recurrence ``h_t = a_t * h_{t-1} + x_t`` (``a_t = exp(delta_t A) <= 1``, ``x_t = delta_t u_t B_t``)
is linear in the state, so a stretch of steps can be scanned from a zero state and corrected
afterwards by the decayed true start state. The sequence is cut into blocks of ``K`` chunks of
``T`` steps; one block is one set of tensors ``(T, K, batch, G, H, N)`` (time-major: step ``t`` of
every chunk is one contiguous slice). Per block, forward:

1. decays and inputs for all ``T * K`` steps with one op each;
2. the chunk-end states from a zero start: ``T`` steps, each one op over all ``K`` chunks at once;
3. the chunk start states: ``K`` steps of ``s_{k+1} = P_k s_k + e_k`` on ``(batch, G, H, N)``, where
   ``P_k = exp(A * sum of delta over chunk k) <= 1`` (one sum and one exp per block);
4. the states from the true starts, ``T`` steps over all chunks, written in place, then
   ``y = <C_t, h_t>`` as one batched product.

So a block costs about ``2T + K`` ops instead of ``T * K``, with ``T ~ K ~ sqrt(steps per block)``;
the op count grows with ``L / sqrt(block)``, and every op works on ``K`` chunks (GPU-sized). The block
length is set by a budget of elements per block tensor (:data:`BLOCK_ELEMENTS`), which bounds the
workspace; the forward keeps only the state at each block start. The backward recomputes one block
at a time and runs the adjoint recurrence ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` the same two-level
way, backwards. Only decays ``<= 1`` (products of them) are ever multiplied in and nothing divides
by a cumulative decay, so nothing can overflow (delta up to 10, A down to -100, any L). The sequence
is padded to whole blocks with ``delta = u = B = C = 0`` (decay exactly 1, no input): the state
passes the padding unchanged.

The op is a ``torch.library`` custom op (forward and backward, with fake implementations) where
torch provides them, so ``torch.compile`` sees one node per call instead of tracing the loops.

Shape letters: batch, G (B/C groups), H = dim / G (channels per group), L, N, T (chunk), K (chunks
per block), J (blocks). Tests: ``tests/ops/test_selective_scan.py``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["chunked_scan", "block_plan", "BLOCK_ELEMENTS"]

# Elements of one (T, K, batch, G, H, N) block tensor: 4M (16 MiB in fp32). Large enough that one op
# fills a GPU and that short or narrow scans take few blocks; a block's workspace is a few such tensors.
BLOCK_ELEMENTS = 2**22


def block_plan(length: int, row_elements: int) -> Tuple[int, int]:
    """(T, K): steps per chunk and chunks per block for a sequence of ``length`` steps whose one step
    holds ``row_elements = batch * dim * N`` state elements."""
    steps = max(1, min(length, BLOCK_ELEMENTS // max(row_elements, 1)))
    blocks = -(-length // steps)
    steps = -(-length // blocks)  # balance the blocks
    chunk = max(1, math.isqrt(steps))
    return chunk, -(-steps // chunk)


def _contract_n(x, v):
    """sum_n x[..., h, n] v[..., n]: x (..., H, N), v (..., N) -> (..., H), one batched matmul."""
    return torch.matmul(x, v[..., None])[..., 0]


def _outer_sum_h(w, x):
    """sum_h w[..., h] x[..., h, n]: w (..., H), x (..., H, N) -> (..., N), one batched matmul."""
    return torch.matmul(w[..., None, :], x)[..., 0, :]


def _terms(d, du, A_g, B_j):
    """Decays a = exp(d A) and inputs x = du B of one block, both (T, K, batch, G, H, N)."""
    a = torch.mul(d[..., None], A_g).exp_()
    x = torch.mul(du[..., None], B_j[..., None, :])
    return a, x


def _chunk_ends(a, x) -> torch.Tensor:
    """Chunk-end states from zero chunk starts, (K, batch, G, H, N)."""
    a_s, x_s = a.unbind(0), x.unbind(0)
    acc = x_s[0]
    for t in range(1, len(x_s)):
        acc = torch.addcmul(x_s[t], a_s[t], acc)
    return acc


def _block_states(d, a, x, A_g, h0):
    """States of one block, written over x.

    d: (T, K, batch, G, H); a, x: (T, K, batch, G, H, N); h0: (batch, G, H, N) state before the block.
    Returns the chunk start states (K, batch, G, H, N), the state at the block end (batch, G, H, N) and
    each chunk's total decay (K, batch, G, H, N).
    """
    ends = _chunk_ends(a, x)
    decay = torch.mul(d.sum(0)[..., None], A_g).exp_()  # P_k = prod of a over chunk k, (K, ...)
    starts: List[torch.Tensor] = [h0]
    for p_k, e_k in zip(decay.unbind(0), ends.unbind(0)):
        starts.append(torch.addcmul(e_k, p_k, starts[-1]))
    last = starts.pop()
    starts_t = torch.stack(starts)
    prev = starts_t
    for a_t, x_t in zip(a.unbind(0), x.unbind(0)):
        prev = torch.addcmul(x_t, a_t, prev, out=x_t)
    return starts_t, last, decay


_CHANNELS = "b (g h) (k t) -> t k b g h"
_GROUPS = "b g n (k t) -> t k b g n"


def _block(tensor, j, steps, spec, **sizes):
    """Block j of a time-last tensor, time-major: (batch, dim, L) -> (T, K, batch, G, H) with
    `_CHANNELS`, (batch, G, N, L) -> (T, K, batch, G, N) with `_GROUPS`; zero-padded to whole steps."""
    piece = tensor[..., j * steps : (j + 1) * steps]
    if piece.shape[-1] < steps:
        piece = F.pad(piece, (0, steps - piece.shape[-1]))
    return rearrange(piece, spec, **sizes).contiguous()


def _unblock(out, j, steps, value, spec):
    """Write a time-major block back into the time-last `out` at block j (padding dropped)."""
    t0 = j * steps
    valid = min(steps, out.shape[-1] - t0)
    out[..., t0 : t0 + valid] = rearrange(value, spec)[..., :valid]


def _scan_forward(u, delta, A, B, C, chunk, per_block):
    """y (batch, dim, L), last state (batch, dim, N), block start states (J, batch, G, H, N)."""
    groups, steps = B.shape[1], chunk * per_block
    sizes = {"g": groups, "t": chunk}
    A_g = rearrange(A, "(g h) n -> g h n", g=groups)
    h = u.new_zeros(u.shape[0], groups, u.shape[1] // groups, A.shape[-1])
    y = u.new_empty(u.shape)
    block_starts = []
    for j in range(-(-u.shape[-1] // steps)):
        block_starts.append(h)
        d = _block(delta, j, steps, _CHANNELS, **sizes)
        a, x = _terms(d, d * _block(u, j, steps, _CHANNELS, **sizes), A_g, _block(B, j, steps, _GROUPS, t=chunk))
        _, h, _ = _block_states(d, a, x, A_g, h)
        _unblock(y, j, steps, _contract_n(x, _block(C, j, steps, _GROUPS, t=chunk)), "t k b g h -> b (g h) (k t)")
    return y, rearrange(h, "b g h n -> b (g h) n").clone(), torch.stack(block_starts)


def _scan_backward(u, delta, A, B, C, block_starts, dy, dlast, chunk, per_block):
    """Gradients (du, ddelta, dA, dB, dC) of the recurrence; dy (batch, dim, L) and dlast (batch, dim, N)
    may be None (no gradient)."""
    groups, steps = B.shape[1], chunk * per_block
    sizes = {"g": groups, "t": chunk}
    A_g = rearrange(A, "(g h) n -> g h n", g=groups)
    dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype)
    carry = (
        torch.zeros_like(block_starts[0]) if dlast is None
        else rearrange(dlast.to(u.dtype), "b (g h) n -> b g h n", g=groups)
    )  # dL/dh at the end of the current block, from everything after it
    du_out, dd_out, dB_out, dC_out = (t.new_empty(t.shape) for t in (u, delta, B, C))
    dA_g = A_g.new_zeros(A_g.shape)
    for j in reversed(range(block_starts.shape[0])):
        d, uu, dy_j = (_block(v, j, steps, _CHANNELS, **sizes) for v in (delta, u, dy))
        B_j, C_j = (_block(v, j, steps, _GROUPS, t=chunk) for v in (B, C))
        du = d * uu
        a, h = _terms(d, du, A_g, B_j)
        starts, _, decay = _block_states(d, a, h, A_g, block_starts[j])  # h: the block's states
        # adjoint g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: chunk heads from zero end carries, then
        # the true carries chunk by chunk, then every step from the true carries
        g = torch.mul(dy_j[..., None], C_j[..., None, :])
        a_s, g_s = a.unbind(0), g.unbind(0)
        acc = g_s[-1]
        for t in range(len(g_s) - 2, -1, -1):
            acc = torch.addcmul(g_s[t], a_s[t + 1], acc)
        head = (a_s[0] * acc).unbind(0)  # a_0 g_0 of each chunk, zero carry
        carries = [carry]
        for k in range(len(head) - 1, -1, -1):  # carry into the end of chunk k-1 = a_0 g_0 of chunk k
            carries.append(torch.addcmul(head[k], decay[k], carries[-1]))
        carry = carries.pop()
        nxt = g_s[-1].add_(torch.stack(carries[::-1]))
        for t in range(len(g_s) - 2, -1, -1):
            nxt = torch.addcmul(g_s[t], a_s[t + 1], nxt, out=g_s[t])
        g_b = _contract_n(g, B_j)  # dL/d(delta u)
        _unblock(dC_out, j, steps, _outer_sum_h(dy_j, h), "t k b g n -> b g n (k t)")
        _unblock(dB_out, j, steps, _outer_sum_h(du, g), "t k b g n -> b g n (k t)")
        _unblock(du_out, j, steps, g_b * d, "t k b g h -> b (g h) (k t)")
        # w = dL/d(delta A) = g_t a_t h_{t-1}; the h_{t-1} of a chunk's first step is its start state
        w = g.mul_(a)
        w[1:].mul_(h[:-1])
        w[0].mul_(starts)
        _unblock(dd_out, j, steps, torch.addcmul((w * A_g).sum(-1), g_b, uu), "t k b g h -> b (g h) (k t)")
        dA_g += w.mul_(d[..., None]).sum((0, 1, 2))
    return du_out, dd_out, rearrange(dA_g, "g h n -> (g h) n"), dB_out, dC_out


def _output_shapes(u, A, B, chunk, per_block):
    """Shapes of y, last state and block start states (for the fake implementation)."""
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[-1]
    blocks = -(-length // (chunk * per_block))
    return (batch, dim, length), (batch, dim, n_state), (blocks, batch, groups, dim // groups, n_state)


class _ChunkedScan(torch.autograd.Function):
    """The op as an autograd.Function, for torch versions without ``torch.library.custom_op``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk, per_block):  # noqa: ANN001 - autograd signature
        y, last, starts = _scan_forward(u, delta, A, B, C, chunk, per_block)
        ctx.save_for_backward(u, delta, A, B, C, starts)
        ctx.plan = (chunk, per_block)
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):  # noqa: ANN001 - autograd signature
        return (*_scan_backward(*ctx.saved_tensors, dy, dlast, *ctx.plan), None, None)


def _run_function(u, delta, A, B, C, chunk, per_block):  # noqa: ANN001
    """The scan through :class:`_ChunkedScan` (what ``_run`` is without custom ops; the op counter of
    ``benchmarks/bench_scan.py`` uses it, as a custom op hides its ATen ops from dispatch modes)."""
    return _ChunkedScan.apply(u, delta, A, B, C, chunk, per_block)


_custom_op = getattr(torch.library, "custom_op", None)
if _custom_op is not None and hasattr(torch.library, "register_autograd"):

    @_custom_op("muse_pyramid::chunked_scan", mutates_args=())
    def _scan_op(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        chunk: int, per_block: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _scan_forward(u, delta, A, B, C, chunk, per_block)

    @_scan_op.register_fake
    def _scan_fake(u, delta, A, B, C, chunk, per_block):  # noqa: ANN001
        return tuple(u.new_empty(s) for s in _output_shapes(u, A, B, chunk, per_block))

    @_custom_op("muse_pyramid::chunked_scan_backward", mutates_args=())
    def _scan_backward_op(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        block_starts: torch.Tensor, dy: Optional[torch.Tensor], dlast: Optional[torch.Tensor],
        chunk: int, per_block: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _scan_backward(u, delta, A, B, C, block_starts, dy, dlast, chunk, per_block)

    @_scan_backward_op.register_fake
    def _scan_backward_fake(u, delta, A, B, C, block_starts, dy, dlast, chunk, per_block):  # noqa: ANN001
        return tuple(t.new_empty(t.shape) for t in (u, delta, A, B, C))

    def _setup_context(ctx, inputs, output):  # noqa: ANN001
        u, delta, A, B, C, chunk, per_block = inputs
        ctx.save_for_backward(u, delta, A, B, C, output[2])
        ctx.plan = (chunk, per_block)

    def _op_backward(ctx, dy, dlast, _dstarts):  # noqa: ANN001
        return (*_scan_backward_op(*ctx.saved_tensors, dy, dlast, *ctx.plan), None, None)

    torch.library.register_autograd("muse_pyramid::chunked_scan", _op_backward, setup_context=_setup_context)

    def _run(u, delta, A, B, C, chunk, per_block):  # noqa: ANN001
        return _scan_op(u, delta, A, B, C, chunk, per_block)[:2]

else:  # torch < 2.4
    _run = _run_function


def chunked_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Recurrence only; all inputs share one floating dtype (fp32 or fp64).

    Args:
        u: ``(batch, dim, L)``.
        delta: final step sizes ``(batch, dim, L)`` (bias and softplus already applied).
        A: ``(dim, N)``.
        B: ``(batch, G, N, L)``.
        C: ``(batch, G, N, L)``.

    Returns:
        ``y (batch, dim, L)`` with ``y_t = <C_t, h_t>`` and ``last_state (batch, dim, N)``.
    """
    chunk, per_block = block_plan(u.shape[-1], u.shape[0] * u.shape[1] * A.shape[-1])
    return _run(u, delta, A, B, C, chunk, per_block)
