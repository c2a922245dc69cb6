"""CLIP4Clip dual encoder over an open_clip CLIP, with a selectable video head.

Shape letters: B videos (or captions) in a batch, T frames, L words (`max_words`), R image side,
H x W patch grid, D CLIP embedding width.

- Text: CLIP's feature at the end-of-text token, projected (`open_clip_text_features`), L2-normalised.
- Video, `sim_header`:
  - "meanP": per-frame CLIP image embeddings, L2-normalised, mean over real frames, L2-normalised.
  - "seqTransf": CLIP4Clip's temporal transformer over the frame embeddings (frame position
    embeddings, 4 residual attention blocks initialised from CLIP's text transformer when the widths
    match, key padding from the frame mask, residual to the input), then meanP.
  - "MUSE": `MUSEHead` over the projected last-layer tokens `(B, T, 1+H*W, D)`, then `pool_video`.
- Score: cosine x exp(logit_scale), CLIP's own scale, clamped to <= 100 after every optimiser step.
Tests: tests/examples/test_model.py.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from muse_pyramid import MUSEConfig, MUSEHead, pool_video

__all__ = ["SIM_HEADERS", "SeqTransfHead", "CLIP4Clip", "build_clip", "build_small_clip", "build_model",
           "OPENAI_TO_OPEN_CLIP", "MAX_LOGIT_SCALE"]

logger = logging.getLogger(__name__)

SIM_HEADERS = ("meanP", "seqTransf", "MUSE")
MAX_LOGIT_SCALE = 100.0
#: OpenAI release names -> open_clip architectures with QuickGELU (used only for --random_init_clip).
OPENAI_TO_OPEN_CLIP = {
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
}


def _backbones():
    from muse_pyramid import backbones

    return backbones


# --------------------------------------------------------------------------------------- CLIP
def build_clip(pretrained_clip_name: str, *, weights_dir: Optional[str] = None,
               random_init: bool = False) -> nn.Module:
    """An open_clip `CLIP` with OpenAI weights, or randomly initialised only when `random_init`.

    Args:
        pretrained_clip_name: "ViT-B/32", "ViT-B/16", ... (looked up as OpenAI's file in `weights_dir`
            or $MUSE_PYRAMID_CLIP_DIR), or a path to an OpenAI-format TorchScript archive or state dict
            of any width/depth (the architecture is read from the weights).
        weights_dir: folder holding OpenAI's `ViT-B-32.pt` etc.
        random_init: build the named architecture with random weights (demo, tests, ablations).
    """
    if random_init:
        import open_clip

        arch = OPENAI_TO_OPEN_CLIP.get(pretrained_clip_name)
        if arch is None:
            raise ValueError(
                f"--random_init_clip needs an architecture name from {sorted(OPENAI_TO_OPEN_CLIP)}, "
                f"got pretrained_clip_name={pretrained_clip_name!r}"
            )
        logger.warning("building %s with RANDOM weights (--random_init_clip)", arch)
        return open_clip.create_model(arch, pretrained=None)
    bb = _backbones()
    path = bb.resolve_openai_weights(pretrained_clip_name, weights_dir)
    return bb.build_open_clip_from_openai(bb.load_openai_state_dict(path))


def build_small_clip(*, embed_dim: int = 64, image_size: int = 32, patch_size: int = 8, vision_width: int = 64,
                     vision_layers: int = 2, text_width: int = 64, text_layers: int = 2, context_length: int = 32,
                     vocab_size: int = 49408) -> nn.Module:
    """A small randomly initialised open_clip `CLIP` (QuickGELU) for the CPU demo and tests.

    Widths are multiples of 64 with 64-wide heads, as in OpenAI's releases, so the architecture can be
    read back from the weights alone (`build_model_from_state`).
    """
    import open_clip

    for name, width in (("vision_width", vision_width), ("text_width", text_width)):
        if width < 64 or width % 64:
            raise ValueError(f"{name} must be a positive multiple of 64 (64-wide heads), got {width}")

    vision = open_clip.CLIPVisionCfg(layers=vision_layers, width=vision_width, head_width=64,
                                     patch_size=patch_size, image_size=image_size)
    text = open_clip.CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=text_width,
                                 heads=text_width // 64, layers=text_layers)
    return open_clip.CLIP(embed_dim, vision, text, quick_gelu=True)


def clip_image_size(clip: nn.Module) -> int:
    """Input side R of CLIP's vision tower."""
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def clip_embed_dim(clip: nn.Module) -> int:
    """Width D of CLIP's joint embedding (the projected token width)."""
    proj = clip.visual.proj
    return int(proj.shape[1] if proj is not None else clip.visual.output_dim)


def clip_context_length(clip: nn.Module) -> int:
    return int(clip.positional_embedding.shape[0])


# ------------------------------------------------------------------------------- seqTransf head
class SeqTransfHead(nn.Module):
    """CLIP4Clip's "seqTransf" temporal transformer over frame embeddings `(B, T, D)`.

    Args:
        dim: D.
        layers: residual attention blocks (CLIP4Clip: 4).
        heads: attention heads (None = D // 64, as CLIP's text transformer).
        max_frames: number of frame position embeddings (CLIP4Clip: 128 max positions).
    """

    def __init__(self, dim: int, *, layers: int = 4, heads: Optional[int] = None, max_frames: int = 128) -> None:
        super().__init__()
        from open_clip.transformer import Transformer

        self.dim, self.max_frames = dim, max_frames
        self.heads = heads or max(1, dim // 64)
        self.frame_position_embeddings = nn.Embedding(max_frames, dim)
        self.transformer = Transformer(dim, layers, self.heads, batch_first=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.frame_position_embeddings.weight, std=0.01)
        proj_std = (self.dim ** -0.5) * ((2 * len(self.transformer.resblocks)) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=self.dim ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.dim) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def init_from_clip(self, clip: nn.Module) -> bool:
        """Copy CLIP's first text blocks and positional rows (CLIP4Clip's init) when widths match."""
        text_blocks = clip.transformer.resblocks
        if clip.transformer.width != self.dim or len(text_blocks) < len(self.transformer.resblocks):
            logger.info("seqTransf: CLIP text width %d != %d, keeping random init", clip.transformer.width, self.dim)
            return False
        for mine, theirs in zip(self.transformer.resblocks, text_blocks):
            mine.load_state_dict(theirs.state_dict())
        rows = min(self.max_frames, clip.positional_embedding.shape[0])
        with torch.no_grad():
            self.frame_position_embeddings.weight[:rows].copy_(clip.positional_embedding[:rows])
        return True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """`frames (B, T, D)`, `frame_mask (B, T)` -> `(B, T, D)` (input + transformer output)."""
        b, t, _ = frames.shape
        if t > self.max_frames:
            raise ValueError(f"seqTransf has {self.max_frames} frame positions, got T={t} frames")
        x = frames + self.frame_position_embeddings.weight[:t]
        # CLIP4Clip: additive -1e6 on padded keys, same for every query and head
        bias = (1.0 - frame_mask.to(x.dtype))[:, None, :] * -1e6
        bias = bias.expand(b, t, t).repeat_interleave(self.heads, dim=0)
        return self.transformer(x, attn_mask=bias) + frames


# ------------------------------------------------------------------------------------ model
class CLIP4Clip(nn.Module):
    """Dual encoder: `encode_text`, `encode_video` and `forward` returning both embeddings + scale.

    Args:
        clip: an open_clip `CLIP` (visual tower with `proj`, text tower with EOT pooling).
        sim_header: "meanP", "seqTransf" or "MUSE".
        head: the video head module for "seqTransf" / "MUSE" (None for "meanP").
        frame_chunk_size: encode at most this many frames per CLIP call (None = all at once).
    """

    def __init__(self, clip: nn.Module, *, sim_header: str = "meanP", head: Optional[nn.Module] = None,
                 frame_chunk_size: Optional[int] = None) -> None:
        super().__init__()
        if sim_header not in SIM_HEADERS:
            raise ValueError(f"sim_header must be one of {SIM_HEADERS}, got {sim_header!r}")
        if (head is None) != (sim_header == "meanP"):
            raise ValueError(f"sim_header {sim_header!r} needs head={'None' if sim_header == 'meanP' else 'a module'}")
        self.clip = clip
        self.sim_header = sim_header
        self.head = head
        self.frame_chunk_size = frame_chunk_size

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def clamp_logit_scale(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        """Clamp `logit_scale` to <= ln(max_scale) in place; call after every optimiser step."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(max=math.log(max_scale))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing inside CLIP's towers (and the head, when it supports it)."""
        self.clip.set_grad_checkpointing(enable)
        if self.head is not None and hasattr(self.head, "set_grad_checkpointing"):
            self.head.set_grad_checkpointing(enable)

    def head_config(self) -> Dict[str, Any]:
        """Plain-data description of the head, stored in checkpoints to rebuild the model."""
        cfg: Dict[str, Any] = {"sim_header": self.sim_header}
        if isinstance(self.head, MUSEHead):
            cfg["muse"] = self.head.config.to_dict()
        elif isinstance(self.head, SeqTransfHead):
            cfg["seq_transf"] = {"layers": len(self.head.transformer.resblocks), "heads": self.head.heads,
                                 "max_frames": self.head.max_frames}
        return cfg

    # ------------------------------------------------------------------ text
    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """`text_ids (B, L)` (zero-padded, end token = max id) -> L2-normalised `(B, D)`.

        Floating-point `(B, D)` input is taken as CLIP's text features already computed (the feature
        cache's `text_feat`) and only normalised.
        """
        if text_ids.ndim != 2:
            raise ValueError(f"text_ids must be (B, L) ids or (B, D) cached features, got shape {tuple(text_ids.shape)}")
        if text_ids.is_floating_point():
            return F.normalize(text_ids.float(), dim=-1)
        return F.normalize(_backbones().open_clip_text_features(self.clip, text_ids), dim=-1)

    # ----------------------------------------------------------------- video
    def _encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """`images (N, 3, R, R)` -> `(N, D)` (meanP, seqTransf) or tokens `(N, 1+H*W, D)` (MUSE)."""
        if self.sim_header == "MUSE":
            fn = lambda x: _backbones().open_clip_tokens(self.clip, x)  # noqa: E731
        else:
            fn = self.clip.encode_image
        step = self.frame_chunk_size or images.shape[0]
        return torch.cat([fn(images[i : i + step]) for i in range(0, images.shape[0], step)], dim=0)

    def encode_frames(self, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """Per-frame features before pooling.

        Args:
            video: `(B, T, 3, R, R)` normalised frames, zero on padded frames; or CLIP's token maps
                already computed, `(B, T, 1+H*W, D)` (the feature cache's `tokens`), which skip CLIP.
            video_mask: `(B, T)`, 1 on real frames.

        Returns:
            `(B, T, D)` frame features after the head (for MUSE, padded frames hold the mean of the real ones). Only real
            frames go through CLIP.
        """
        if video.ndim not in (4, 5):
            raise ValueError(f"video must be frames (B, T, 3, R, R) or token maps (B, T, 1+H*W, D), got shape "
                             f"{tuple(video.shape)}")
        if video_mask.shape != video.shape[:2]:
            raise ValueError(f"video_mask must be (B, T) = {tuple(video.shape[:2])}, got {tuple(video_mask.shape)}")
        valid = video_mask.bool()
        if not bool(valid.any(dim=1).all()):
            raise ValueError("every video needs at least one real frame (a row of video_mask is all zero)")
        if video.ndim == 4:  # cached token maps: row 0 of a frame is CLIP's image embedding
            full = (video if self.sim_header == "MUSE" else video[:, :, 0]).float()
            full = full * valid.view(*valid.shape, *([1] * (full.ndim - 2))).to(full.dtype)
        else:
            feats = self._encode_frames(video[valid])
            full = feats.new_zeros(*video.shape[:2], *feats.shape[1:])
            full[valid] = feats
        return full if self.head is None else self.head(full, video_mask)

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """`video (B, T, 3, R, R)`, `video_mask (B, T)` -> L2-normalised `(B, D)`."""
        return pool_video(self.encode_frames(video, video_mask), video_mask)

    def freeze_clip(self) -> None:
        """`requires_grad = False` on every CLIP weight but the logit scale (`--frozen_clip`)."""
        for name, p in self.clip.named_parameters():
            p.requires_grad_(name == "logit_scale")

    def forward(self, text_ids: torch.Tensor, video: torch.Tensor,
                video_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns text `(B, D)`, video `(B, D)` (both unit norm) and the scalar `logit_scale`.

        `text_ids` / `video` may be cached CLIP outputs instead (see `encode_text`, `encode_frames`).
        """
        return self.encode_text(text_ids), self.encode_video(video, video_mask), self.clip.logit_scale


def build_model(clip: nn.Module, *, sim_header: str = "MUSE", muse: Optional[Mapping[str, Any]] = None,
                seq_transf: Optional[Mapping[str, Any]] = None, max_frames: int = 12,
                init_seq_from_clip: bool = True, frame_chunk_size: Optional[int] = None) -> CLIP4Clip:
    """Wrap `clip` with the head named by `sim_header`.

    Args:
        muse: `MUSEConfig` fields (dim is taken from CLIP when absent); ignored unless "MUSE".
        seq_transf: `SeqTransfHead` kwargs (layers, heads, max_frames).
        max_frames: frames per video, for the seqTransf position table (at least 128 positions).
    """
    dim = clip_embed_dim(clip)
    head: Optional[nn.Module] = None
    if sim_header == "MUSE":
        cfg = dict(muse or {})
        if cfg.get("dim", dim) != dim:
            raise ValueError(f"MUSE dim {cfg['dim']} does not match CLIP's embedding width {dim}")
        cfg["dim"] = dim
        head = MUSEHead.from_config(MUSEConfig.from_dict(cfg))
    elif sim_header == "seqTransf":
        kwargs = {"max_frames": max(128, max_frames), **dict(seq_transf or {})}
        head = SeqTransfHead(dim, **kwargs)
        if init_seq_from_clip:
            head.init_from_clip(clip)
    elif sim_header != "meanP":
        raise ValueError(f"sim_header must be one of {SIM_HEADERS}, got {sim_header!r}")
    return CLIP4Clip(clip, sim_header=sim_header, head=head, frame_chunk_size=frame_chunk_size)

