"""open_clip (``pip install open_clip_torch``): the projected token map, and a CLIP built from OpenAI weights.

open_clip's own ``output_tokens=True`` is not what MUSE needs: it returns the patch tokens after
``ln_post`` but before ``proj`` (768 wide for ViT-B) and without the CLS token. `open_clip_tokens`
applies ``ln_post`` and ``proj`` to every token, CLS included, so row 0 is ``encode_image``.

Shape letters: N images, H*W patch grid, D projection width (512 for ViT-B, 768 for ViT-L).
Tests: ``tests/backbones/test_open_clip.py``, ``tests/backbones/test_weights.py``.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from torch import nn

from ._common import check_images, check_quick_gelu, embed_patches, require
from .weights import check_openai_vit, is_openai_release, strip_sentinels

__all__ = ["build_open_clip_from_openai", "open_clip_tokens"]

logger = logging.getLogger(__name__)


def open_clip_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-layer token map of an open_clip ViT, after ``ln_post`` and ``proj``.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` or its ``.visual`` (a ``VisionTransformer``
            with CLS-token pooling, as every CLIP ViT config has).
        images: `(N, 3, H, W)`, preprocessed as the model expects.

    Returns:
        `(N, 1+H'*W', D)`: CLS first, then the patches row-major. Row 0 equals
        ``model.encode_image(images)`` (not normalised). Without a projection (``proj is None``)
        the tokens are the ``ln_post`` outputs.
    """
    open_clip = require("open_clip")
    images = check_images(images)
    visual = getattr(model, "visual", model)
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise TypeError(
            f"model must be an open_clip CLIP ViT or its .visual (VisionTransformer), got {type(visual).__name__}; "
            "ResNet and timm-tower models have no CLS token map"
        )
    averaged = getattr(visual, "global_average_pool", False)  # older open_clip's name for pool_type='avg'
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" or averaged:
        raise ValueError(
            f"model.visual pools with pool_type={getattr(visual, 'pool_type', None)!r} / an attention pooler, "
            "so its token 0 is not its image embedding; only CLS-token ('tok') pooling is supported"
        )
    if visual.training and not isinstance(visual.patch_dropout, nn.Identity):
        raise ValueError(
            "model.visual drops patch tokens in training mode (patch_dropout > 0), so its map has no full grid; "
            "build it with patch_dropout=0 for MUSE"
        )
    # The same steps as VisionTransformer.forward (and its `_embeds`), keeping every token.
    x = visual.patch_dropout(embed_patches(visual, images))
    x = visual.ln_pre(x)
    if getattr(visual.transformer, "batch_first", False):
        x = visual.transformer(x)
    else:  # open_clip < 2.24 runs its transformer sequence-first
        x = visual.transformer(x.transpose(0, 1)).transpose(0, 1)
    x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj
    return x


def build_open_clip_from_openai(
    state_dict: Dict[str, torch.Tensor], quick_gelu: Optional[bool] = None
) -> nn.Module:
    """An open_clip ``CLIP`` (fp32, eval mode) holding OpenAI-layout ViT weights.

    The architecture is read from the weights (width, depth, patch size, image size, text width and
    context length; heads = width / 64 as in OpenAI's releases), so any ViT release or a fine-tuned
    copy in OpenAI's layout loads. Weights are cast to float32.

    Args:
        state_dict: OpenAI layout, e.g. from `load_openai_state_dict`.
        quick_gelu: activation of the model to build. None: QuickGELU, which all OpenAI releases use.
            Passing False for an OpenAI release (`is_openai_release`) warns with
            `QuickGELUMismatchWarning`: it gives wrong features without any error. For weights in this
            layout trained with GELU (e.g. LAION's open_clip models), pass False.

    Returns:
        The model, in eval mode.
    """
    open_clip = require("open_clip")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    check_openai_vit(state_dict)
    openai = is_openai_release(state_dict)
    if quick_gelu is None:
        quick_gelu = True
        if not openai:
            logger.info("state_dict is not marked as an OpenAI release; building with QuickGELU as OpenAI's CLIP")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in strip_sentinels(state_dict).items()}

    conv = state_dict["visual.conv1.weight"]  # (width, 3, patch, patch)
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({k for k in state_dict if k.startswith("visual.transformer.resblocks.") and k.endswith("attn.in_proj_weight")})
    text_width = state_dict["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
    vision_cfg = open_clip.model.CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=patch * grid)
    text_cfg = open_clip.model.CLIPTextCfg(
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        width=text_width,
        heads=max(text_width // 64, 1),
        layers=text_layers,
    )
    model = open_clip.model.CLIP(
        state_dict["text_projection"].shape[1], vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu
    )
    if openai:
        check_quick_gelu(model, expected=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
