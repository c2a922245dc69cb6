"""Token orders for the sequence mixer (MUSE Sec. 3.2: scale-wise, frame-wise, spatial-wise).

Shape letters: B = videos, T = frames per video, S_k = tokens of pyramid level k in one frame,
C = channels, L = mixer sequence length.

Per video, with frames f1..fT and levels s1..sK:

    scale_wise    [CLS_f1..CLS_fT, s1(f1)..s1(fT), s2(f1)..s2(fT), ...]       L = T * (1 + sum S_k)
    frame_wise    [CLS_f1, s1(f1), s2(f1), ..., CLS_f2, s1(f2), ...]          L = T * (1 + sum S_k)
    spatial_wise  [CLS_f1..CLS_fT, mean_t s1(ft), mean_t s2(ft), ...]         L = T + sum S_k

Padded frames (frame mask 0) are moved behind every real token, keeping the order of the real ones
(a stable sort), so a video of n real frames padded to T starts with exactly the sequence of the
same n frames alone; `spatial_wise` averages over real frames only. The mixers then leave the padded
tail out of the real tokens' computation (see `mamba.py`). Tests: `tests/test_aggregate.py`.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
from einops import rearrange
from torch import nn

from ._validate import check_choice, check_frame_mask, check_tensor
from .config import AGGREGATIONS, MUSEConfig
from .ops._dispatch import is_compiling

__all__ = ["AggregatedSequence", "ScaleAggregator"]


class AggregatedSequence(NamedTuple):
    """The mixer input built by `ScaleAggregator`.

    tokens: `(B, L, C)` sequence; mask: `(B, L)` bool, True on real tokens (None when every token is
    real); cls_index: `(B, T)` long, the position of each frame's CLS token in the sequence.
    """

    tokens: torch.Tensor
    mask: Optional[torch.Tensor]
    cls_index: torch.Tensor


class ScaleAggregator(nn.Module):
    """Arrange CLS tokens and pyramid levels into one sequence per video (parameter-free).

    Args:
        mode: "scale_wise" (paper default), "frame_wise" or "spatial_wise" (ablations).
    """

    def __init__(self, mode: str = MUSEConfig.aggregation) -> None:
        super().__init__()
        check_choice("mode", mode, AGGREGATIONS)
        self.mode = mode

    def sequence_length(self, frames: int, level_tokens: Sequence[int]) -> int:
        """Length L of the sequence for `frames` frames with `level_tokens[k]` tokens per level and frame."""
        if self.mode == "spatial_wise":
            return frames + sum(level_tokens)
        return frames * (1 + sum(level_tokens))

    def forward(
        self,
        cls: torch.Tensor,
        levels: Sequence[torch.Tensor],
        frame_mask: Optional[torch.Tensor] = None,
    ) -> AggregatedSequence:
        """Build the mixer sequence.

        Args:
            cls: `(B, T, C)` CLS token of every frame.
            levels: per pyramid level, `(B, T, S_k, C)` tokens of every frame, row-major inside a frame.
            frame_mask: `(B, T)`, 1 / True on real frames; None = all real.

        Returns:
            `AggregatedSequence(tokens (B, L, C), mask (B, L) | None, cls_index (B, T))`.
        """
        check_tensor("cls", cls, 3, "(B, T, C)")
        b, t, c = cls.shape
        if len(levels) == 0:
            raise ValueError("levels must hold at least one pyramid level, got 0")
        for k, level in enumerate(levels):
            check_tensor(f"levels[{k}]", level, 4, "(B, T, S_k, C)")
            if level.shape[:2] != cls.shape[:2] or level.shape[3] != c:
                raise ValueError(
                    f"levels[{k}] must have shape (B, T, S_k, C) = ({b}, {t}, S_k, {c}), got {tuple(level.shape)}"
                )
        mask = check_frame_mask(frame_mask, b, t)
        if mask is not None and not is_compiling() and bool(mask.all()):  # eager only: a host sync
            mask = None

        if self.mode == "scale_wise":
            parts = [cls] + [rearrange(lv, "b t s c -> b (t s) c") for lv in levels]
            tokens = torch.cat(parts, dim=1)
            valid = None if mask is None else torch.cat(
                [mask] + [mask.repeat_interleave(lv.shape[2], dim=1) for lv in levels], dim=1
            )
            cls_pos = torch.arange(t, device=cls.device)
        elif self.mode == "frame_wise":
            per_frame = torch.cat([cls[:, :, None]] + list(levels), dim=2)  # (B, T, 1 + sum S_k, C)
            stride = per_frame.shape[2]
            tokens = rearrange(per_frame, "b t s c -> b (t s) c")
            valid = None if mask is None else mask.repeat_interleave(stride, dim=1)
            cls_pos = torch.arange(t, device=cls.device) * stride
        else:  # spatial_wise
            means = [self._masked_mean(lv, mask) for lv in levels]  # each (B, S_k, C)
            tokens = torch.cat([cls] + means, dim=1)
            valid = None if mask is None else torch.cat(
                [mask, mask.new_ones(b, sum(m.shape[1] for m in means))], dim=1
            )
            cls_pos = torch.arange(t, device=cls.device)

        if valid is None:
            return AggregatedSequence(tokens, None, cls_pos.expand(b, t))
        # Real tokens first, original order kept: a stable sort on "is padding".
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # (B, L)
        tokens = tokens.gather(1, order[..., None].expand(-1, -1, c))
        inverse = torch.argsort(order, dim=1)
        cls_index = inverse.gather(1, cls_pos.expand(b, t))
        return AggregatedSequence(tokens, valid.gather(1, order), cls_index)

    @staticmethod
    def _masked_mean(level: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """level: `(B, T, S, C)`, mask: `(B, T)` -> mean over real frames `(B, S, C)`."""
        if mask is None:
            return level.mean(dim=1)
        w = mask.to(level.dtype)[:, :, None, None]
        level = torch.where(w > 0, level, torch.zeros((), dtype=level.dtype, device=level.device))
        return level.sum(dim=1) / w.sum(dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def levels_to_tokens(levels: List[torch.Tensor], batch: int) -> List[torch.Tensor]:
    """Pyramid maps `(B*T, C, h, w)` -> tokens `(B, T, h*w, C)` (row-major inside a frame)."""
    return [rearrange(lv, "(b t) c h w -> b t (h w) c", b=batch) for lv in levels]
