"""MUSE in a Hugging Face CLIP pipeline with text-conditioned frame pooling (the X-Pool / T-MASS family).

Such pipelines take one CLIP feature per frame from `CLIPModel.get_image_features` and pool the frames
of a video with an attention whose query is the text, so that every (text, video) pair gets its own
video embedding. MUSE goes in between, with two lines (see `HFVideoRetrieval.frame_features`):

    tokens = hf_clip_tokens(clip, pixel_values)              # (B*T, 1+H*W, D) instead of (B*T, D)
    frames = head(tokens.view(B, T, *tokens.shape[1:]), mask)   # (B, T, D): new per-frame features

and the pooling receives MUSE's per-frame features instead of CLIP's, with the same shape.

    python examples/hf_text_pooling.py --steps 20               # a small random CLIPModel, random data
    python examples/hf_text_pooling.py --clip_dir ./clip-vit-base-patch32 --steps 0   # local weights

`--clip_dir` is a local Hugging Face checkpoint folder (`CLIPModel.from_pretrained(dir)`); nothing is
downloaded. Tests: `tests/examples/test_hf_text_pooling.py`. Guide: docs/integration.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

try:
    import muse_pyramid  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from muse_pyramid import MUSEHead
from muse_pyramid.backbones import hf_clip_tokens

logger = logging.getLogger("hf_text_pooling")


def _embeds(out) -> torch.Tensor:
    """`CLIPModel.get_*_features` output -> `(N, D)`: a tensor in transformers 4, `.pooler_output` in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class TextConditionedPool(nn.Module):
    """Attention pooling of a video's frames with the text as the query, one embedding per pair.

    Args:
        dim: feature width D of texts and frames.
        num_heads: attention heads; must divide `dim`.
        dropout: dropout on the attention output.
    """

    def __init__(self, dim: int, num_heads: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_text = nn.LayerNorm(dim)
        self.norm_frames = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, text: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """text `(Bt, D)`, frames `(Bv, T, D)`, frame_mask `(Bv, T)` (1 = real) -> `(Bt, Bv, D)`."""
        q = rearrange(self.q(self.norm_text(text)), "t (h d) -> h t d", h=self.num_heads)
        k, v = rearrange(self.kv(self.norm_frames(frames)), "v f (two h d) -> two h v f d", two=2, h=self.num_heads)
        logits = torch.einsum("htd,hvfd->htvf", q, k) / q.shape[-1] ** 0.5
        logits = logits.masked_fill(~frame_mask.bool()[None, None], float("-inf"))
        pooled = torch.einsum("htvf,hvfd->htvd", logits.softmax(dim=-1), v)
        pooled = self.out(rearrange(pooled, "h t v d -> t v (h d)"))
        return self.norm_out(self.drop(pooled))


class HFVideoRetrieval(nn.Module):
    """Hugging Face `CLIPModel` + optional `MUSEHead` + `TextConditionedPool`, scored by cosine similarity.

    Args:
        clip: a `transformers.CLIPModel`.
        head: a `MUSEHead` of width `clip.config.projection_dim`, or None for CLIP's own frame features.
        pool: the text-conditioned pooling; None builds a `TextConditionedPool`.
    """

    def __init__(self, clip: nn.Module, head: Optional[MUSEHead] = None, pool: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.clip = clip
        self.head = head
        self.pool = pool if pool is not None else TextConditionedPool(clip.config.projection_dim)

    def frame_features(self, video: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """video `(B, T, 3, H, W)` pixel values, frame_mask `(B, T)` -> per-frame features `(B, T, D)`."""
        b, t = video.shape[:2]
        pixels = rearrange(video, "b t c h w -> (b t) c h w")
        if self.head is None:  # the host's original line
            return rearrange(_embeds(self.clip.get_image_features(pixel_values=pixels)), "(b t) d -> b t d", b=b, t=t)
        tokens = hf_clip_tokens(self.clip, pixels)  # MUSE: the whole last-layer token map ...
        return self.head(rearrange(tokens, "(b t) n d -> b t n d", b=b, t=t), frame_mask)  # ... and the head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, video: torch.Tensor,
                frame_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask `(Bt, L)`; video `(Bv, T, 3, H, W)`; frame_mask `(Bv, T)` ->
        similarity logits `(Bt, Bv)` (cosine x CLIP's logit scale)."""
        text = _embeds(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        videos = self.pool(text, self.frame_features(video, frame_mask), frame_mask)  # (Bt, Bv, D)
        cos = torch.einsum("td,tvd->tv", F.normalize(text, dim=-1), F.normalize(videos, dim=-1))
        return self.clip.logit_scale.exp() * cos

    def param_groups(self, lr: float, weight_decay: float = 0.2) -> List[dict]:
        """CLIP at `lr`, the pooling at 10x, the head's own groups at 10x (no decay on its no_weight_decay())."""
        groups = [{"params": list(self.clip.parameters()), "lr": lr, "weight_decay": weight_decay},
                  {"params": list(self.pool.parameters()), "lr": 10 * lr, "weight_decay": weight_decay}]
        return groups + (self.head.param_groups(10 * lr, weight_decay) if self.head is not None else [])


def tiny_clip(seed: int = 0) -> nn.Module:
    """A small randomly initialised `CLIPModel` (64 px, 16 px patches, 64-wide towers, 32-d embedding)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=1000, max_position_embeddings=32),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32,
    )
    return CLIPModel(config)


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """logits `(B, B)`, matching pairs on the diagonal -> (CE(S) + CE(S^T)) / 2."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def random_batch(batch: int, frames: int, words: int, size: int, vocab: int, seed: int = 0) -> tuple:
    """Random text ids `(B, L)`, attention mask, pixel values `(B, T, 3, size, size)`, prefix frame mask `(B, T)`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (batch, words), generator=g)
    ids[:, -1] = vocab - 1
    video = torch.randn(batch, frames, 3, size, size, generator=g)
    real = torch.randint(1, frames + 1, (batch,), generator=g)
    frame_mask = (torch.arange(frames)[None] < real[:, None]).long()
    return ids, torch.ones_like(ids), video, frame_mask


def main(argv: Optional[List[str]] = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip_dir", type=Path, help="local Hugging Face CLIPModel folder (default: a small random CLIP)")
    parser.add_argument("--steps", type=int, default=10, help="training steps on random data (default: 10)")
    parser.add_argument("--batch_size", type=int, default=4, help="videos per batch (default: 4)")
    parser.add_argument("--frames", type=int, default=4, help="frames per video (default: 4)")
    parser.add_argument("--lr", type=float, default=1e-5, help="CLIP learning rate; head and pooling 10x (default: 1e-5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.clip_dir is not None:
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(args.clip_dir, local_files_only=True)
    else:
        clip = tiny_clip()
    model = HFVideoRetrieval(clip, MUSEHead(clip.config.projection_dim))
    optimizer = torch.optim.AdamW(model.param_groups(args.lr))
    size, vocab = clip.config.vision_config.image_size, clip.config.text_config.vocab_size
    loss = torch.tensor(float("nan"))
    model.train()
    for step in range(args.steps):
        ids, attn, video, frame_mask = random_batch(args.batch_size, args.frames, 16, size, vocab, seed=step)
        loss = symmetric_infonce(model(ids, attn, video, frame_mask))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logger.info("step %d: loss %.4f", step + 1, loss.item())
    return float(loss.detach())


if __name__ == "__main__":
    main()
