"""Symmetric InfoNCE over the global batch (CLIP4Clip's loss, MUSE paper Sec. 4).

Shapes: N = per-process batch, W = world size, D = embedding width.

Every process gathers the text and video embeddings of all processes, builds the same
(W*N, W*N) score matrix and computes the same loss. `gather_with_grad` is an all-gather whose
backward sums the incoming gradients over processes and keeps the local slice: since every
process computes the identical global loss L, the local features receive W * dL/dx_local, and
DDP's averaging over W processes then yields exactly dL/dtheta, the gradient of single-process
training on the whole global batch. No extra loss scaling is needed with this gather (a gather
that only returns the local slice's own gradient would need the loss multiplied by W).
Tests: tests/examples/test_loss.py, tests/examples/test_distributed.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["gather_with_grad", "symmetric_infonce", "contrastive_loss"]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward: sum the gradient over processes, return the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x (N, D)` from all processes in rank order -> `(W*N, D)`, differentiably.

    Without an initialised process group (or with one process) `x` is returned unchanged. All
    processes must pass the same N (the training loader drops the last incomplete batch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def symmetric_infonce(text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """`(CE(S) + CE(S^T)) / 2` with `S = exp(logit_scale) * text @ video^T`, matches on the diagonal.

    Args:
        text: L2-normalised text embeddings `(M, D)`.
        video: L2-normalised video embeddings `(M, D)`; row i is the match of text row i.
        logit_scale: scalar log temperature (CLIP's `logit_scale`, before `exp`).
    """
    if text.ndim != 2 or text.shape != video.shape:
        raise ValueError(
            f"text and video must both be (M, D) with equal shapes; got text {tuple(text.shape)}, "
            f"video {tuple(video.shape)}"
        )
    sim = logit_scale.exp() * text.float() @ video.float().t()
    target = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2


def contrastive_loss(text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Global-batch loss: gather `text (N, D)` and `video (N, D)` from all processes, then InfoNCE.

    The value equals `symmetric_infonce` on the concatenated global batch, and (with DDP's gradient
    averaging) so does every parameter gradient; see the module docstring.
    """
    return symmetric_infonce(gather_with_grad(text), gather_with_grad(video), logit_scale)
