"""timm CLIP ViTs (``vit_base_patch32_clip_quickgelu_224`` and friends): the projected token map.

In timm a CLIP image tower is a ``VisionTransformer`` with ``pre_norm=True``; the final LayerNorm
(OpenAI's ``ln_post``) is ``model.norm`` and the projection (OpenAI's ``proj``) is ``model.head``,
present when the model is built with ``num_classes`` = the embedding width (512 for ViT-B,
768 for ViT-L). `timm_clip_tokens` applies ``norm``, ``fc_norm`` and ``head`` to every token.

Shape letters: N images, H*W patch grid, D projection width.
Tests: ``tests/backbones/test_timm.py``, ``tests/backbones/test_weights.py``.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ._common import check_images, require

__all__ = ["openai_to_timm_state_dict", "timm_clip_tokens"]


def timm_clip_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-layer token map of a timm CLIP ViT, after the final norm and the head (projection).

    Args:
        model: a timm ``VisionTransformer`` with one class token and ``global_pool='token'``
            (every ``*_clip_*`` ViT), built with ``num_classes`` = the CLIP embedding width so that
            ``model.head`` is the visual projection. With ``num_classes=0`` the tokens are unprojected.
        images: `(N, 3, H, W)`, preprocessed as the model expects.

    Returns:
        `(N, 1+H'*W', D)`: CLS first, then the patches row-major. Row 0 equals ``model(images)``.
    """
    timm = require("timm")
    images = check_images(images)
    if not isinstance(model, timm.models.vision_transformer.VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (a *_clip_* ViT), got {type(model).__name__}")
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None or model.global_pool != "token" or model.num_prefix_tokens != 1:
        raise ValueError(
            f"model pools with global_pool={model.global_pool!r} over {model.num_prefix_tokens} prefix tokens"
            f"{' and an attention pooler' if attn_pool is not None else ''}; "
            "expected global_pool='token' with one class token, as timm's CLIP ViTs have"
        )
    x = model.forward_features(images)  # (N, 1+H*W, width), after the final norm
    # forward_head is pool -> fc_norm -> head_drop -> head; each but the pool acts per token.
    return model.head(getattr(model, "head_drop", nn.Identity())(model.fc_norm(x)))


def openai_to_timm_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """OpenAI-layout CLIP weights -> timm ``VisionTransformer`` keys (the image tower only).

    Uses timm's own converter (``checkpoint_filter_fn``), which maps ``visual.proj`` onto
    ``head.weight`` with a zero ``head.bias``; resizes the position embedding if the model's image
    size differs.
    """
    timm = require("timm")
    visual = {k: v for k, v in state_dict.items() if k.startswith("visual.")}
    return timm.models.vision_transformer.checkpoint_filter_fn(visual, model)
