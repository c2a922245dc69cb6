"""Simple feature pyramid (ViTDet, Li et al. 2022) over a ViT's last-layer patch map (MUSE Sec. 3.1).

Shape letters: N = frames in the batch (B*T), C = channels, H x W = patch grid, h x w = grid of a level.

Per scale factor s, the `(N, C, H, W)` map goes through

    s = 4.0   ConvT(C -> C/2, k2 s2), LN, GELU, ConvT(C/2 -> C/4, k2 s2)
    s = 2.0   ConvT(C -> C/2, k2 s2)
    s = 1.0   identity
    s = 0.5   MaxPool(k2 s2)           (floor: 7 -> 3)
    s = 0.25  MaxPool(k4 s4)

then the shared tail Conv1x1(-> C), LN, GELU, Conv3x3(C -> C, pad 1), LN. LN is a LayerNorm over the
channels of a NCHW map, computed in fp32. The 1x1 convolution runs as a linear map over the channels
(`PointwiseConv2d`, same parameters as `nn.Conv2d(kernel_size=1)`). Tests: `tests/test_pyramid.py`.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._validate import check_choice, check_tensor
from .config import SCALES, MUSEConfig

__all__ = ["LayerNorm2d", "PointwiseConv2d", "PyramidLevel", "FeaturePyramid"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of a `(N, C, H, W)` map, computed in fp32 and cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `(N, C, H, W)` -> `(N, C, H, W)`."""
        y = rearrange(x, "n c h w -> n h w c").float()
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(y, self.normalized_shape, weight, bias, self.eps)
        return rearrange(y.to(x.dtype), "n h w c -> n c h w")


class PointwiseConv2d(nn.Conv2d):
    """1x1 convolution computed as a linear map over the channels; the parameters (and their names and
    shapes) are those of `nn.Conv2d(in_channels, out_channels, kernel_size=1)`.

    Why not the convolution itself: on a channels-last input (which is what `LayerNorm2d` and the head's
    token-to-map rearrange produce), oneDNN and cuDNN return the weight's gradient with channels-last
    strides. For a `(C_out, C_in, 1, 1)` weight autograd keeps that gradient as it is (only size-1 dims
    differ), and DistributedDataParallel then warns "Grad strides do not match bucket view strides" and
    copies it every step. Here the gradient always has the weight's own contiguous strides.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `(N, C_in, H, W)` -> `(N, C_out, H, W)` (channels-last in memory when x is)."""
        y = F.linear(rearrange(x, "n c h w -> n h w c"), self.weight.flatten(1), self.bias)
        return rearrange(y, "n h w c -> n c h w")


def _resample(dim: int, scale: float) -> tuple:
    """The scale-specific first ops of a branch and their output width."""
    if scale == 4.0:
        half = dim // 2
        ops = [
            nn.ConvTranspose2d(dim, half, kernel_size=2, stride=2),
            LayerNorm2d(half),
            nn.GELU(),
            nn.ConvTranspose2d(half, dim // 4, kernel_size=2, stride=2),
        ]
        return ops, dim // 4
    if scale == 2.0:
        return [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)], dim // 2
    if scale == 1.0:
        return [], dim
    if scale == 0.5:
        return [nn.MaxPool2d(kernel_size=2, stride=2)], dim
    return [nn.MaxPool2d(kernel_size=4, stride=4)], dim  # 0.25


class PyramidLevel(nn.Sequential):
    """One branch of the pyramid: the scale's resampling ops, then Conv1x1, LN, GELU, Conv3x3, LN."""

    def __init__(self, dim: int, scale: float) -> None:
        check_choice("scale", float(scale), SCALES)
        if scale >= 2.0 and dim % 4:
            raise ValueError(f"dim must be divisible by 4 for scale {scale}, got dim={dim}")
        ops, width = _resample(dim, float(scale))
        super().__init__(
            *ops,
            PointwiseConv2d(width, dim),
            LayerNorm2d(dim),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel_size=3, padding=1),
            LayerNorm2d(dim),
        )
        self.scale = float(scale)

    def output_size(self, height: int, width: int) -> tuple:
        """Grid `(h, w)` this level produces from an `(H, W)` input grid."""
        if self.scale >= 1.0:
            return int(height * self.scale), int(width * self.scale)
        k = int(round(1 / self.scale))
        return height // k, width // k

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class FeaturePyramid(nn.Module):
    """ViTDet simple feature pyramid: one `PyramidLevel` per scale factor, registered in a ModuleList.

    Args:
        dim: channels C of the input map and of every level.
        scales: scale factors, each in (0.25, 0.5, 1.0, 2.0, 4.0); the output keeps this order.
    """

    def __init__(self, dim: int, scales: Sequence[float] = MUSEConfig.scales) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        scales = tuple(float(s) for s in scales)
        if not scales:
            raise ValueError("scales must name at least one scale factor, got ()")
        self.dim = dim
        self.scales = scales
        self.levels = nn.ModuleList([PyramidLevel(dim, s) for s in scales])

    def output_sizes(self, height: int, width: int) -> List[tuple]:
        """Grid `(h_s, w_s)` of every level for an `(H, W)` input grid."""
        return [level.output_size(height, width) for level in self.levels]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x: `(N, C, H, W)` patch map -> list of `(N, C, h_s, w_s)`, one per scale, in `scales` order."""
        check_tensor("x", x, 4, "(N, C, H, W)")
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have C = dim = {self.dim} channels (N, C, H, W), got shape {tuple(x.shape)}")
        for size, scale in zip(self.output_sizes(x.shape[2], x.shape[3]), self.scales):
            if min(size) < 1:
                raise ValueError(
                    f"x has a {x.shape[2]}x{x.shape[3]} grid, too small for scale {scale} (gives {size})"
                )
        return [level(x) for level in self.levels]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scales={self.scales}"
