"""Private helpers that raise the library's `ValueError`/`TypeError` messages.

Each message names the argument, what it got and what it expects, so that bad input never
surfaces as a stack trace from deep inside torch.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch

from .ops._dispatch import is_compiling as _compiling

__all__ = ["check_tensor", "check_choice", "infer_grid", "check_frame_mask", "check_positions", "check_prefix_mask"]


def check_tensor(name: str, x: object, ndim: int, expected: str) -> torch.Tensor:
    """Check that `x` is a floating tensor of rank `ndim`; `expected` is the shape in words."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {expected} ({ndim} dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Check that `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def infer_grid(num_patches: int, grid: Optional[Sequence[int]], name: str = "tokens") -> Tuple[int, int]:
    """Return (H, W) of the patch grid from the number of patch tokens (square unless `grid` is given)."""
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h * w != num_patches:
            raise ValueError(
                f"{name} has 1+{num_patches} tokens per frame but grid={tuple(grid)} expects 1+{h}*{w}="
                f"{1 + h * w}"
            )
        return h, w
    side = int(round(num_patches**0.5))
    if side * side != num_patches or num_patches == 0:
        raise ValueError(
            f"{name} has {1 + num_patches} tokens per frame, which is not 1+H*W for a square grid; "
            f"pass grid=(H, W) with H*W = {num_patches}"
        )
    return side, side


def check_frame_mask(frame_mask: Optional[torch.Tensor], batch: int, frames: int) -> Optional[torch.Tensor]:
    """Validate a `(B, T)` frame mask (1 = real frame) and return it as bool, or None if all frames are real."""
    if frame_mask is None:
        return None
    if not isinstance(frame_mask, torch.Tensor):
        raise TypeError(f"frame_mask must be a torch.Tensor of shape (B, T), got {type(frame_mask).__name__}")
    if tuple(frame_mask.shape) != (batch, frames):
        raise ValueError(
            f"frame_mask must have shape (B, T) = ({batch}, {frames}), got shape {tuple(frame_mask.shape)}"
        )
    mask = frame_mask.bool() if frame_mask.dtype != torch.bool else frame_mask
    empty = ~mask.any(dim=1)
    if not _compiling() and bool(empty.any()):  # a value check: eager only (no host sync in a graph)
        idx = empty.nonzero().flatten().tolist()
        raise ValueError(f"frame_mask marks no real frame for video(s) {idx}; every video needs >= 1 frame")
    return mask


def check_positions(positions: object, batch: int, length: int) -> torch.Tensor:
    """Validate `(B, P)` integer row indices into a length-`length` sequence; returns them as int64.

    The range of the values is checked for CPU tensors outside `torch.compile` only: on an accelerator,
    reading min/max would stall the host on every call (an out-of-range index there fails inside
    `gather` instead)."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of shape (B, P), got {type(positions).__name__}")
    if positions.ndim != 2 or positions.shape[0] != batch:
        raise ValueError(f"positions must have shape (B, P) with B = {batch}, got shape {tuple(positions.shape)}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    if positions.device.type == "cpu" and not _compiling() and positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= length):
        raise ValueError(
            f"positions must index rows in [0, {length}), got values in [{int(positions.min())}, {int(positions.max())}]"
        )
    return positions.long()


def check_prefix_mask(mask: object, shape: Sequence[int]) -> torch.Tensor:
    """Validate a `(B, L)` token mask whose real tokens (True) come before the padding; returns it as bool.

    The order of the values is checked for CPU tensors outside `torch.compile` only: elsewhere reading
    it back would stall the host on every call."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape (B, L), got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape (B, L) = {tuple(shape)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    if mask.device.type == "cpu" and not _compiling():
        bad = (mask[:, 1:] & ~mask[:, :-1]).any(dim=1)  # a real token right after a padded one
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"mask must hold its real tokens (True) before the padding, rows {rows} do not")
    return mask
