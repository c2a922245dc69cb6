"""ResMamba block (MUSE Sec. 3.3) and the self-attention mixer of the paper's ablation.

Shape letters: B = batch, L = sequence length, C = channels.

    x <- x + proj(dropout(mixer(norm(x))))

`proj` is a Linear(C, C) initialised to zero (the "gated residual"), so every block starts as the
identity. Tests: `tests/test_block.py`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ._validate import check_choice, check_positions, check_tensor
from .config import MIXERS, MUSEConfig
from .mamba import BiMamba

__all__ = ["AttentionMixer", "ResMambaBlock"]


class AttentionMixer(nn.Module):
    """Multi-head self-attention (PyTorch SDPA) with a key padding mask.

    Args:
        dim: token width C.
        num_heads: attention heads; must divide `dim`.
    """

    def __init__(self, dim: int, num_heads: int = MUSEConfig.num_heads) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation of both projections."""
        self.qkv.reset_parameters()
        self.out_proj.reset_parameters()

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x: `(B, L, C)`; mask: `(B, L)` bool, True on real tokens (keys) -> `(B, L, C)`.

        positions: `(B, P)` integer row indices: only those rows are queried and returned, `(B, P, C)`.
        """
        if mask is not None:  # padded rows out before the projections: NaN there must not reach real rows
            x = torch.where(mask.bool()[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        if positions is not None:
            positions = check_positions(positions, x.shape[0], x.shape[1])
            q = q.gather(2, repeat(positions, "b p -> b h p d", h=q.shape[1], d=q.shape[3]))
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(rearrange(y, "b h l d -> b l (h d)"))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class ResMambaBlock(nn.Module):
    """LayerNorm -> mixer -> dropout -> zero-initialised Linear -> residual.

    Args:
        dim: token width C.
        mixer: "bimamba" (paper), "mamba" (forward-only) or "attention" (ablation).
        dropout: plain dropout probability after the mixer.
        d_state, d_conv, expand, dt_rank: Mamba hyper-parameters (ignored by "attention").
        num_heads: heads of the attention mixer (ignored by the Mamba mixers).
        scan_backend, conv_backend: force a kernel backend for the Mamba mixers.
    """

    def __init__(
        self,
        dim: int,
        mixer: str = MUSEConfig.mixer,
        dropout: float = MUSEConfig.dropout,
        d_state: int = MUSEConfig.d_state,
        d_conv: int = MUSEConfig.d_conv,
        expand: int = MUSEConfig.expand,
        dt_rank: Union[int, str] = MUSEConfig.dt_rank,
        num_heads: int = MUSEConfig.num_heads,
        scan_backend: Optional[str] = None,
        conv_backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_choice("mixer", mixer, MIXERS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim = dim
        self.mixer_type = mixer
        self.norm = nn.LayerNorm(dim)
        if mixer == "attention":
            self.mixer: nn.Module = AttentionMixer(dim, num_heads=num_heads)
        else:
            self.mixer = BiMamba(
                dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                bidirectional=mixer == "bimamba", scan_backend=scan_backend, conv_backend=conv_backend,
            )
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self._reset_residual()  # the mixer initialised itself when it was built

    def reset_parameters(self) -> None:
        """The block's whole initialisation: the mixer's own, a reset norm, a zero output projection."""
        self.mixer.reset_parameters()
        self._reset_residual()

    def _reset_residual(self) -> None:
        """Zero the output projection so the block starts as the identity; reset the norm."""
        self.norm.reset_parameters()
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: `(B, L, C)` tokens.
            mask: `(B, L)` bool, True on real tokens (real tokens first); None = all real.
            positions: `(B, P)` integer row indices, or None for all rows. Given, only those rows of the
                output are computed and returned, `(B, P, C)` (the mixer still reads every row): what a
                last block whose other rows are discarded needs.

        Returns:
            `(B, L, C)`, or `(B, P, C)` with `positions`.
        """
        check_tensor("x", x, 3, "(B, L, C)")
        if positions is None:
            return x + self.proj(self.drop(self.mixer(self.norm(x), mask)))
        mixed = self.mixer(self.norm(x), mask, positions)  # the mixer validates positions
        rows = x.gather(1, repeat(positions.long(), "b p -> b p c", c=x.shape[-1]))
        return rows + self.proj(self.drop(mixed))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mixer={self.mixer_type!r}, dropout={self.drop.p}"
