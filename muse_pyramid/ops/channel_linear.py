"""Linear maps between the token-major `(B, L, K)` layout and the channel-major `(B, M, L)` one.

Mamba's conv and scan read channel-major maps (time contiguous, one row per channel), while the
residual stream around them is token-major. `in_proj` and `out_proj` therefore change layout as
they project:

    tokens_to_channels(x, W, b) = rearrange(F.linear(x, W, b), "b l m -> b m l")     x: (B, L, K)
    channels_to_tokens(y, W, b) = F.linear(rearrange(y, "b k l -> b l k"), W, b)    y: (B, K, L)

both returning contiguous tensors. On CUDA these are batched matmuls on transposed views (cuBLAS
reads either layout at full speed). On the CPU, one large GEMM whose output rows are time steps of a
channel (the channel-major products) runs 20-30% below the machine's GEMM rate in MKL; the CPU path
computes those products in column blocks of `_COLUMN_BLOCK` steps, which keeps them at full rate,
and writes every gradient straight into the layout its consumer wants (no transposed copies).
`benchmarks/bench_head.py` measures the effect on the whole head; tests:
`tests/ops/test_channel_linear.py`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

__all__ = ["tokens_to_channels", "channels_linear", "channels_to_tokens"]

# Time steps per block of a channel-major GEMM on the CPU (256-384 measured best on AVX-512 hosts).
_COLUMN_BLOCK = 256


def _check(name: str, t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layout: str) -> None:
    """Shape checks shared by the three maps; `layout` names the expected input shape."""
    for arg, v in ((name, t), ("weight", weight), ("bias", bias)):
        if v is not None and not isinstance(v, torch.Tensor):
            raise TypeError(f"argument `{arg}` must be a torch.Tensor, got {type(v).__name__}")
    if t.dim() != 3:
        raise ValueError(f"argument `{name}` must have shape {layout}, got {tuple(t.shape)}")
    k = t.shape[2] if layout == "(B, L, K)" else t.shape[1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"argument `weight` must have shape (M, K) with K = {k}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"argument `bias` must have shape (M,) = ({weight.shape[0]},), got {tuple(bias.shape)}")


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _cpu_path(*tensors: Optional[torch.Tensor]) -> bool:
    """The blocked CPU path applies to CPU tensors of one floating dtype, outside autocast."""
    present = [t for t in tensors if t is not None]
    return (
        all(t.device.type == "cpu" for t in present)
        and len({t.dtype for t in present}) == 1
        and present[0].is_floating_point()
        and not _autocast_on()
    )


def _mm_channel_major(a: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor) -> None:
    """out `(M, L)` = a `(M, K)` @ tokens.T, tokens `(L, K)`, in column blocks of `_COLUMN_BLOCK` steps."""
    for start in range(0, tokens.shape[0], _COLUMN_BLOCK):
        stop = start + _COLUMN_BLOCK
        torch.mm(a, tokens[start:stop].t(), out=out[:, start:stop])


def _sum_mm(pairs) -> torch.Tensor:
    """Sum of `a @ b` over the (a, b) pairs, accumulated in place (`out=` rather than `addmm_`, which
    `torch.utils.flop_counter` does not count)."""
    (a0, b0), *rest = pairs
    acc = torch.mm(a0, b0)
    for a, b in rest:
        torch.addmm(acc, a, b, out=acc)
    return acc


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` `(B, R, S)` with every `t[b]` a dense `(R, S)` matrix (a split along dim 1 keeps that), else a copy."""
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


# The three maps differ in four places only: the output layout, the forward product, the product for the
# input gradient, and the operands of the weight gradient (always (M, L) @ (L, K)). Per batch element,
# with x_b the input, g_b the output gradient and W (M, K):
_TOKENS_TO_CHANNELS, _CHANNELS_LINEAR, _CHANNELS_TO_TOKENS = "tokens_to_channels", "channels_linear", "channels_to_tokens"


def _forward_product(kind: str, x_b: torch.Tensor, weight: torch.Tensor, out_b: torch.Tensor) -> None:
    if kind == _TOKENS_TO_CHANNELS:  # (M, K) @ (L, K).T, channel-major: blocked
        _mm_channel_major(weight, x_b, out_b)
    elif kind == _CHANNELS_LINEAR:  # (M, K) @ (K, L)
        torch.mm(weight, x_b, out=out_b)
    else:  # (L, K) @ (K, M)
        torch.mm(x_b.t(), weight.t(), out=out_b)


def _input_grad_product(kind: str, g_b: torch.Tensor, weight: torch.Tensor, dx_b: torch.Tensor) -> None:
    if kind == _TOKENS_TO_CHANNELS:  # (L, M) @ (M, K)
        torch.mm(g_b.t(), weight, out=dx_b)
    elif kind == _CHANNELS_LINEAR:  # (K, M) @ (M, L)
        torch.mm(weight.t(), g_b, out=dx_b)
    else:  # (K, M) @ (L, M).T, channel-major: blocked
        _mm_channel_major(weight.t(), g_b, dx_b)


def _weight_grad_operands(kind: str, g_b: torch.Tensor, x_b: torch.Tensor) -> tuple:
    if kind == _TOKENS_TO_CHANNELS:
        return g_b, x_b
    if kind == _CHANNELS_LINEAR:
        return g_b, x_b.t()
    return g_b.t(), x_b.t()


class _BatchedLinear(torch.autograd.Function):
    """One of the three maps on the CPU: per batch element, every product written in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kind: str) -> torch.Tensor:
        x = _rows_contiguous(x)
        tokens_out = kind == _CHANNELS_TO_TOKENS
        length = x.shape[1] if kind == _TOKENS_TO_CHANNELS else x.shape[2]
        shape = (x.shape[0], length, weight.shape[0]) if tokens_out else (x.shape[0], weight.shape[0], length)
        out = x.new_empty(shape)
        for b in range(x.shape[0]):
            _forward_product(kind, x[b], weight, out[b])
        if bias is not None:
            out.add_(bias if tokens_out else bias[:, None])
        ctx.save_for_backward(x, weight)
        ctx.kind, ctx.has_bias = kind, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = x.new_empty(x.shape)
            for b in range(x.shape[0]):
                _input_grad_product(ctx.kind, grad[b], weight, dx[b])
        if ctx.needs_input_grad[1]:
            dw = _sum_mm(_weight_grad_operands(ctx.kind, grad[b], x[b]) for b in range(x.shape[0]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad.sum(dim=(0, 1) if ctx.kind == _CHANNELS_TO_TOKENS else (0, 2))
        return dx, dw, db, None


def tokens_to_channels(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project tokens into a channel-major map.

    Args:
        x: `(B, L, K)` tokens.
        weight: `(M, K)`, as in `nn.Linear`.
        bias: `(M,)` or None.

    Returns:
        `(B, M, L)` contiguous, equal to `F.linear(x, weight, bias).transpose(1, 2)`.
    """
    _check("x", x, weight, bias, "(B, L, K)")
    if _cpu_path(x, weight, bias):
        return _BatchedLinear.apply(x, weight, bias, _TOKENS_TO_CHANNELS)
    w = weight.expand(x.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(w, x.transpose(1, 2))
    return torch.baddbmm(bias[:, None], w, x.transpose(1, 2))


def channels_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project a channel-major map to another channel-major map.

    Args:
        x: `(B, K, L)` channel-major map.
        weight: `(M, K)`, as in `nn.Linear`.
        bias: `(M,)` or None.

    Returns:
        `(B, M, L)` contiguous, equal to `F.linear(x.transpose(1, 2), weight, bias).transpose(1, 2)`.
    """
    _check("x", x, weight, bias, "(B, K, L)")
    if _cpu_path(x, weight, bias):
        return _BatchedLinear.apply(x, weight, bias, _CHANNELS_LINEAR)
    w = weight.expand(x.shape[0], -1, -1)
    return torch.bmm(w, x) if bias is None else torch.baddbmm(bias[:, None], w, x)


def channels_to_tokens(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project a channel-major map back to tokens.

    Args:
        y: `(B, K, L)` channel-major map.
        weight: `(M, K)`, as in `nn.Linear`.
        bias: `(M,)` or None.

    Returns:
        `(B, L, M)` contiguous, equal to `F.linear(y.transpose(1, 2), weight, bias)`.
    """
    _check("y", y, weight, bias, "(B, K, L)")
    if _cpu_path(y, weight, bias):
        return _BatchedLinear.apply(y, weight, bias, _CHANNELS_TO_TOKENS)
    w = weight.t().expand(y.shape[0], -1, -1)
    return torch.bmm(y.transpose(1, 2), w) if bias is None else torch.baddbmm(bias, y.transpose(1, 2), w)
