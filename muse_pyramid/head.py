"""`MUSEHead`: the multi-scale Mamba head of MUSE (Tang et al., AAAI 2025), and video pooling.

Shape letters: B = videos, T = frames per video, H x W = patch grid, C = channels,
L = mixer sequence length.

    tokens (B, T, 1+H*W, C)  --split-->  CLS (B, T, C),  patch map (B*T, C, H, W)
    patch map --FeaturePyramid--> levels [(B*T, C, h_s, w_s)]
    CLS + levels --ScaleAggregator--> sequence (B, L, C) + mask + CLS positions
    sequence --ResMambaBlock x depth--> read the CLS positions --> (B, T, C)

The output is a new feature per frame; `pool_video` turns them into one normalised video embedding.

Host safety (the head is dropped into code it does not control):
- padded frames get the mean of the video's real output frames: finite and non-zero whatever the
  padding held (zeros, garbage, NaN), so a host that L2-normalises every frame before masking never
  divides by zero, and a host that averages all T rows without a mask still gets the masked mean;
- tokens of another floating dtype than the head's parameters (fp16 CLIP output into an fp32 head)
  are cast to the parameters' dtype (autocast, when enabled, still chooses the compute dtype);
- `reset_parameters()` restores the paper's initialisation, and the first training forward warns
  (`InitOverwrittenWarning`) when a host's weight init has visibly overwritten it.

Tests: `tests/test_head.py`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._validate import check_frame_mask, check_tensor, infer_grid
from .aggregate import ScaleAggregator, levels_to_tokens
from .block import ResMambaBlock
from .config import MUSEConfig
from .ops import conv_backend, scan_backend
from .ops._cpu_kernel import kernel_usable
from .ops._dispatch import is_compiling
from .pyramid import FeaturePyramid

__all__ = ["InitOverwrittenWarning", "MUSEHead", "pool_video"]

logger = logging.getLogger(__name__)


class InitOverwrittenWarning(UserWarning):
    """The head's initialisation was overwritten after construction (e.g. by a host's `init_weights`)."""


class MUSEHead(nn.Module):
    """Feature pyramid + scale-wise aggregation + ResMamba blocks over CLIP's last-layer tokens.

    Args:
        dim: token width C (512 for CLIP ViT-B, 768 for ViT-L).
        scales: pyramid scale factors from (0.25, 0.5, 1.0, 2.0, 4.0), in sequence order.
        depth: number of ResMamba blocks.
        aggregation: "scale_wise" (paper), "frame_wise" or "spatial_wise".
        mixer: "bimamba" (paper), "mamba" or "attention".
        d_state, d_conv, expand, dt_rank: Mamba hyper-parameters.
        dropout: dropout of the last block; block i gets dropout * i / (depth - 1).
        num_heads: heads of the attention mixer.
        trainable_pyramid: False freezes the pyramid (still saved), as the public release did by accident.
        grid: `(H, W)` of the patch grid when it is not square; None infers a square grid.
        scan_backend, conv_backend: force a kernel backend (see `muse_pyramid.ops`); None = automatic.
    """

    def __init__(
        self,
        dim: int = MUSEConfig.dim,
        *,
        scales: Sequence[float] = MUSEConfig.scales,
        depth: int = MUSEConfig.depth,
        aggregation: str = MUSEConfig.aggregation,
        mixer: str = MUSEConfig.mixer,
        d_state: int = MUSEConfig.d_state,
        d_conv: int = MUSEConfig.d_conv,
        expand: int = MUSEConfig.expand,
        dt_rank: Union[int, str] = MUSEConfig.dt_rank,
        dropout: float = MUSEConfig.dropout,
        num_heads: int = MUSEConfig.num_heads,
        trainable_pyramid: bool = MUSEConfig.trainable_pyramid,
        grid: Optional[Tuple[int, int]] = MUSEConfig.grid,
        scan_backend: Optional[str] = None,
        conv_backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self._config = MUSEConfig(
            dim=dim, scales=tuple(scales), depth=depth, aggregation=aggregation, mixer=mixer,
            d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, dropout=dropout,
            num_heads=num_heads, trainable_pyramid=trainable_pyramid, grid=grid,
        )
        self.dim = dim
        self.grid = self._config.grid
        self.pyramid = FeaturePyramid(dim, scales)
        self.aggregator = ScaleAggregator(aggregation)
        rates = torch.linspace(0.0, dropout, depth).tolist() if depth > 1 else [dropout]
        self.blocks = nn.ModuleList(
            [
                ResMambaBlock(
                    dim, mixer=mixer, dropout=p, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                    num_heads=num_heads, scan_backend=scan_backend, conv_backend=conv_backend,
                )
                for p in rates
            ]
        )
        self.pyramid.requires_grad_(trainable_pyramid)
        self.grad_checkpointing = False
        self._backend_logged = False
        self._init_checked = False

    def reset_parameters(self) -> None:
        """Restore the paper's initialisation of the whole head.

        Pyramid convs and norms get PyTorch's defaults; every block its mixer's own initialisation
        (Mamba's dt, A_log, D), a reset norm and a zero output projection, so each block is the identity
        again. Call it after a host's blanket re-initialisation (for example CLIP4Clip's
        `self.apply(self.init_weights)`, which redraws every `nn.Linear` and zeroes its bias).
        """
        for module in self.pyramid.modules():
            if module is not self.pyramid and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        self._init_checked = False

    def init_overwritten(self) -> List[str]:
        """Names of the parameters whose values show that the initialisation was overwritten.

        Mamba's `dt_proj.bias` starts at softplus^-1 of a delta in [dt_min, dt_max] (never 0); a bias that
        is exactly zero everywhere is the mark of a blanket `nn.Linear` re-initialisation, after which
        the state decays within a few tokens and the pyramid levels far from the CLS tokens get no
        gradient. Reads parameter values (a host sync on an accelerator): call it once, not per step.
        """
        return [
            name for name, p in self.named_parameters()
            if name.endswith(("dt_proj.bias", "dt_proj_b.bias")) and not bool(p.detach().any())
        ]

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> MUSEConfig:
        """The `MUSEConfig` this head was built from (`config.to_dict()` goes into checkpoints)."""
        return self._config

    @classmethod
    def from_config(cls, config: Union[MUSEConfig, Mapping[str, Any]], **overrides: Any) -> MUSEHead:
        """Build a head from a `MUSEConfig` or its dict form; `overrides` are extra constructor kwargs."""
        cfg = config if isinstance(config, MUSEConfig) else MUSEConfig.from_dict(config)
        kwargs = cfg.to_dict()
        dim = kwargs.pop("dim")
        kwargs["grid"] = tuple(kwargs["grid"]) if kwargs["grid"] is not None else None
        return cls(dim, **{**kwargs, **overrides})

    # ------------------------------------------------------------ optimisation
    def no_weight_decay(self) -> set:
        """Names (relative to this head) of parameters that take no weight decay.

        Biases, norm weights and every other 1-D parameter, plus what each submodule's own
        `no_weight_decay()` names (Mamba's `A_log`/`D` and `_b` twins). Name-based, so it survives
        `copy.deepcopy` and pickling, which drop attributes tagged onto parameters.
        """
        names = {name for name, p in self.named_parameters() if p.ndim <= 1}
        for prefix, module in self.named_modules():
            if module is not self and callable(getattr(module, "no_weight_decay", None)):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        return names

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> List[Dict[str, Any]]:
        """Optimizer parameter groups: decayed weights, and the `no_weight_decay()` set at decay 0.

        Only parameters that require a gradient are included. Give the head its own `lr` (the paper
        uses 10x the base learning rate).
        """
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if name in skip else decay).append(p)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ forward
    def sequence_length(self, frames: int, grid: Tuple[int, int]) -> int:
        """Mixer sequence length L for `frames` frames of an `(H, W)` patch grid."""
        sizes = self.pyramid.output_sizes(*grid)
        return self.aggregator.sequence_length(frames, [h * w for h, w in sizes])

    def forward_features(
        self, tokens: torch.Tensor, frame_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Pyramid, aggregation and blocks.

        Args:
            tokens: `(B, T, 1+H*W, C)` CLS + row-major patch tokens of every frame.
            frame_mask: `(B, T)`, 1 on real frames; None = all real.

        Returns:
            mixed sequence `(B, L, C)`, its mask `(B, L)` or None, CLS positions `(B, T)`.
        """
        seq, seq_mask, cls_index = self._aggregate(tokens, frame_mask)
        return self._mix(seq, seq_mask), seq_mask, cls_index

    def forward_head(self, seq: torch.Tensor, cls_index: torch.Tensor, frame_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Read the CLS positions out: seq `(B, L, C)`, cls_index `(B, T)` -> `(B, T, C)`.

        Padded frames (frame_mask `(B, T)` == 0) get the mean of their video's real frames, as in `forward`.
        """
        out = seq.gather(1, cls_index[..., None].expand(-1, -1, seq.shape[-1]))
        return self._fill_padding(out, frame_mask)

    def forward(self, tokens: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """New per-frame features.

        The same as `forward_head(seq, cls_index, frame_mask)` on `seq, _, cls_index =
        forward_features(tokens, frame_mask)`, but the last block computes its output at the CLS
        positions only, the only rows read out (its mixer still reads the whole sequence): its gate,
        `out_proj`, dropout, projection and residual run on T rows instead of L.

        Args:
            tokens: `(B, T, 1+H*W, C)` last-layer CLIP tokens (after ln_post and the visual projection).
            frame_mask: `(B, T)`, 1 on real frames, 0 on padding; None = all real.

        Returns:
            `(B, T, C)` features at the CLS positions, in the head's parameter dtype. Padded frames get
            the mean of their video's real output frames (see the module docstring).
        """
        seq, seq_mask, cls_index = self._aggregate(tokens, frame_mask)
        return self._fill_padding(self._mix(seq, seq_mask, cls_index), frame_mask)

    def _aggregate(
        self, tokens: torch.Tensor, frame_mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """tokens `(B, T, 1+H*W, C)` -> pyramid levels in the aggregation order: sequence `(B, L, C)`,
        its mask `(B, L)` or None, CLS positions `(B, T)`."""
        check_tensor("tokens", tokens, 4, "(B, T, 1+H*W, C)")
        b, t, p, c = tokens.shape
        if b == 0 or t == 0:
            raise ValueError(f"tokens must hold at least one video and one frame (B, T, 1+H*W, C), got shape {tuple(tokens.shape)}")
        if c != self.dim:
            raise ValueError(f"tokens must have shape (B, T, 1+H*W, C) with C = dim = {self.dim}, got {tuple(tokens.shape)}")
        h, w = infer_grid(p - 1, self.grid)
        self._log_backend(tokens)
        self._check_init()
        dtype = self.blocks[0].norm.weight.dtype
        if tokens.dtype != dtype:  # e.g. fp16 CLIP output into an fp32 head: one cast at the boundary
            tokens = tokens.to(dtype)
        cls = tokens[:, :, 0]
        patch_map = rearrange(tokens[:, :, 1:], "b t (h w) c -> (b t) c h w", h=h, w=w)
        levels = levels_to_tokens(self.pyramid(patch_map), b)
        # The aggregator validates frame_mask (shape, at least one real frame per video) once.
        return self.aggregator(cls, levels, frame_mask)

    def _mix(
        self, seq: torch.Tensor, seq_mask: Optional[torch.Tensor], positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The blocks: seq `(B, L, C)` -> `(B, L, C)`, or `(B, P, C)` at `positions` `(B, P)` (last block)."""
        for i, block in enumerate(self.blocks):
            rows = positions if i == len(self.blocks) - 1 else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                seq = checkpoint(block, seq, seq_mask, rows, use_reentrant=False)
            else:
                seq = block(seq, seq_mask, rows)
        return seq

    @staticmethod
    def _fill_padding(frames: torch.Tensor, frame_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """frames `(B, T, C)` with the rows of padded frames (frame_mask `(B, T)` == 0) replaced by the
        mean of the video's real rows (finite, independent of the padded input, no host sync)."""
        if frame_mask is None:
            return frames
        real = frame_mask.bool()[..., None]
        zero = torch.zeros((), dtype=frames.dtype, device=frames.device)
        kept = torch.where(real, frames, zero)  # where, not a product: NaN in a padded row stays out
        mean = kept.sum(dim=1, keepdim=True) / real.sum(dim=1, keepdim=True).clamp(min=1).to(frames.dtype)
        return torch.where(real, frames, mean)

    def _check_init(self) -> None:
        """Once, at the first training forward: warn when the initialisation was overwritten."""
        if self._init_checked or not self.training or is_compiling():
            return
        self._init_checked = True
        names = self.init_overwritten()
        if names:
            warnings.warn(
                f"MUSEHead: {len(names)} Mamba dt_proj biases are exactly zero ({names[0]}, ...): the head's "
                "initialisation was overwritten after construction, typically by a host applying its own "
                "init to every nn.Linear (e.g. CLIP4Clip's self.apply(self.init_weights)). The blocks are no "
                "longer the identity at start and the scan forgets within a few tokens. Build the head after "
                "the host's init, or call head.reset_parameters() after it.",
                InitOverwrittenWarning, stacklevel=3,
            )

    def _log_backend(self, tokens: torch.Tensor) -> None:
        if self._backend_logged or is_compiling():
            return
        self._backend_logged = True
        mixer = self._config.mixer
        if mixer == "attention":
            logger.info("MUSEHead: attention mixer (scaled_dot_product_attention) on %s", tokens.device)
        else:
            scan = scan_backend(tokens)
            # the scan computes in fp64 for an fp64 head, else in fp32
            dtype = torch.float64 if self.blocks[0].norm.weight.dtype == torch.float64 else torch.float32
            fused = scan == "torch" and kernel_usable(tokens.device, dtype, self._config.d_state)
            logger.info(
                "MUSEHead: %s mixer on %s, selective scan backend %r%s, causal conv backend %r",
                mixer, tokens.device, scan, " (fused CPU kernel)" if fused else "", conv_backend(tokens),
            )

    def extra_repr(self) -> str:
        cfg = self._config
        return f"dim={cfg.dim}, depth={cfg.depth}, aggregation={cfg.aggregation!r}, mixer={cfg.mixer!r}"


def pool_video(frame_features: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalised video embedding: per-frame L2 norm, mean over real frames, L2 norm.

    Args:
        frame_features: `(B, T, C)` per-frame features (e.g. `MUSEHead` output).
        frame_mask: `(B, T)`, 1 on real frames; None = all real.

    Returns:
        `(B, C)` unit-norm video embeddings (`(0, C)` for an empty batch).
    """
    check_tensor("frame_features", frame_features, 3, "(B, T, C)")
    b, t, _ = frame_features.shape
    if t == 0:
        raise ValueError(f"frame_features must hold at least one frame per video (B, T, C), got shape {tuple(frame_features.shape)}")
    mask = check_frame_mask(frame_mask, b, t)
    x = F.normalize(frame_features, dim=-1)
    if mask is None:
        return F.normalize(x.mean(dim=1), dim=-1)
    w = mask.to(x.dtype)[..., None]
    x = torch.where(w > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return F.normalize(x.sum(dim=1) / w.sum(dim=1), dim=-1)
