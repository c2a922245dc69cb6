"""Frames -> token maps for whole videos, encoded in chunks to bound memory.

Shape letters: B videos, T frames, L = 1+H*W tokens per frame, D token width.
Tests: ``tests/backbones/test_video.py``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from einops import rearrange

from .._validate import check_frame_mask, check_tensor

__all__ = ["encode_video"]


def encode_video(
    encode_fn: Callable[[torch.Tensor], torch.Tensor],
    frames: torch.Tensor,
    chunk_size: Optional[int] = None,
    frame_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Encode every frame of a batch of videos into its token map.

    Args:
        encode_fn: images `(N, 3, H, W)` -> tokens `(N, L, D)`, e.g.
            ``functools.partial(open_clip_tokens, model)``.
        frames: `(B, T, 3, H, W)`.
        chunk_size: encode at most this many frames per call (None: all B*T at once). Under
            ``torch.no_grad()`` this bounds peak memory; with gradients the activations of every
            chunk are kept for the backward pass.
        frame_mask: `(B, T)`, 1 on real frames. Padded frames are not encoded; their tokens are zeros.

    Returns:
        `(B, T, L, D)` tokens, in the dtype `encode_fn` returns.
    """
    frames = check_tensor("frames", frames, 5, "(B, T, 3, H, W)")
    b, t = frames.shape[:2]
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    mask = check_frame_mask(frame_mask, b, t)
    flat = rearrange(frames, "b t c h w -> (b t) c h w")
    keep = None if mask is None else mask.reshape(-1).to(flat.device)
    images = flat if keep is None else flat[keep]
    step = chunk_size or images.shape[0]
    tokens = torch.cat([encode_fn(chunk) for chunk in images.split(step)], dim=0)
    if tokens.ndim != 3 or tokens.shape[0] != images.shape[0]:
        raise ValueError(
            f"encode_fn must map images (N, 3, H, W) to tokens (N, L, D); for N={images.shape[0]} it gave "
            f"shape {tuple(tokens.shape)}"
        )
    if keep is not None:
        full = tokens.new_zeros(b * t, *tokens.shape[1:])
        full[keep] = tokens
        tokens = full
    return rearrange(tokens, "(b t) l d -> b t l d", b=b)
