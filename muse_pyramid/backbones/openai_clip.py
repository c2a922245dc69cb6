"""OpenAI's CLIP module layout (OpenAI's ``clip/model.py``, CLIP4Clip's ``module_clip.py``): the token map.

The vision tower is a ``VisionTransformer`` (CLIP4Clip: ``VisualTransformer``) with ``conv1``,
``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer`` (sequence-first, LND),
``ln_post`` and ``proj``. OpenAI's ``forward`` returns the projected CLS token only, CLIP4Clip's
returns the hidden sequence before ``ln_post``; `openai_clip_tokens` runs the submodules itself so it
gives the same map for both. No extra is needed: this layout is plain PyTorch.

Shape letters: N images, H*W patch grid, D projection width.
Tests: ``tests/backbones/test_openai_clip.py``, ``tests/backbones/test_weights.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_images, embed_patches

__all__ = ["openai_clip_tokens"]

_PARTS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")


def openai_clip_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-layer token map of an OpenAI-layout CLIP ViT, after ``ln_post`` and ``proj``.

    Args:
        visual: the vision tower (``clip_model.visual``) or the whole CLIP model.
        images: `(N, 3, H, W)`, preprocessed as the model expects; cast to the model's dtype
            (``conv1.weight.dtype``) as OpenAI's ``encode_image`` does.

    Returns:
        `(N, 1+H'*W', D)` in the model's dtype: CLS first, then the patches row-major. Row 0 equals
        ``model.encode_image(images)`` (CLIP4Clip's ``encode_image(..., return_hidden=True)`` gives
        the same map as its second output).
    """
    images = check_images(images)
    if not hasattr(visual, "conv1") and hasattr(visual, "visual"):
        visual = visual.visual
    missing = [p for p in _PARTS if not hasattr(visual, p)]
    if missing:
        raise TypeError(
            f"visual must be an OpenAI-layout CLIP ViT (or a CLIP holding one as .visual); "
            f"{type(visual).__name__} lacks {missing}"
        )
    x = visual.ln_pre(embed_patches(visual, images.to(visual.conv1.weight.dtype)))
    x = visual.transformer(x.transpose(0, 1)).transpose(0, 1)  # NLD -> LND -> NLD
    x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj
    return x
