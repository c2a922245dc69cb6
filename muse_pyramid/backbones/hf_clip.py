"""Hugging Face transformers CLIP: the projected token map, OpenAI weights, and a tokenizer check.

``last_hidden_state`` of a Hugging Face CLIP vision tower is taken *before* ``post_layernorm``
(OpenAI's ``ln_post``) and is not projected; only the pooled output goes through both.
`hf_clip_tokens` applies ``post_layernorm`` and ``visual_projection`` to every token.

Offline, ``CLIPTokenizer.from_pretrained(...)`` can silently return a tokenizer with 2 tokens that
maps every word to the same id; `check_hf_tokenizer` detects it.

Shape letters: N images, H*W patch grid, D projection width.
Tests: ``tests/backbones/test_hf.py``, ``tests/backbones/test_weights.py``, ``tests/backbones/test_text.py``.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ._common import check_images, require

__all__ = ["check_hf_tokenizer", "hf_clip_tokens", "openai_to_hf_state_dict"]


def _vision_parts(model: nn.Module) -> tuple:
    vision, projection = getattr(model, "vision_model", None), getattr(model, "visual_projection", None)
    if vision is None or projection is None or not hasattr(vision, "post_layernorm"):
        raise TypeError(
            f"model must be a Hugging Face CLIPVisionModelWithProjection or CLIPModel (a vision tower with "
            f"a visual_projection), got {type(model).__name__}"
        )
    return vision, projection


def hf_clip_tokens(model: nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """Last-layer token map of a Hugging Face CLIP, after ``post_layernorm`` and ``visual_projection``.

    Args:
        model: ``CLIPVisionModelWithProjection`` or ``CLIPModel``.
        pixel_values: `(N, 3, H, W)`, as the model's image processor gives them.
        interpolate_pos_encoding: passed to the vision tower (for image sizes other than the model's).

    Returns:
        `(N, 1+H'*W', D)`: CLS first, then the patches row-major. Row 0 equals
        ``CLIPVisionModelWithProjection(...).image_embeds`` / ``CLIPModel.get_image_features``.
    """
    require("transformers")
    pixel_values = check_images(pixel_values, "pixel_values")
    vision, projection = _vision_parts(model)
    extra = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}  # transformers >= 4.44
    out = vision(pixel_values=pixel_values, return_dict=True, **extra)
    return projection(vision.post_layernorm(out.last_hidden_state))


def openai_to_hf_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """OpenAI-layout CLIP weights -> keys of a Hugging Face CLIP vision tower and its projection.

    The fused attention input projection (``in_proj_weight``, ``(3*width, width)``) is split into
    ``q_proj``, ``k_proj``, ``v_proj``; ``visual.proj`` `(width, D)` becomes ``visual_projection.weight``
    `(D, width)`. Text weights are not converted.
    """
    _vision_parts(model)
    out: Dict[str, torch.Tensor] = {}
    vm = "vision_model."
    simple = {
        "visual.class_embedding": f"{vm}embeddings.class_embedding",
        "visual.conv1.weight": f"{vm}embeddings.patch_embedding.weight",
        "visual.positional_embedding": f"{vm}embeddings.position_embedding.weight",
        "visual.ln_pre.weight": f"{vm}pre_layrnorm.weight",
        "visual.ln_pre.bias": f"{vm}pre_layrnorm.bias",
        "visual.ln_post.weight": f"{vm}post_layernorm.weight",
        "visual.ln_post.bias": f"{vm}post_layernorm.bias",
    }
    block = {
        "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    }
    prefix = "visual.transformer.resblocks."
    for key, value in state_dict.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key.startswith(prefix):
            index, name = key[len(prefix):].split(".", 1)
            layer = f"{vm}encoder.layers.{index}."
            if name.startswith("attn.in_proj_"):
                kind = name.rsplit("_", 1)[-1]  # weight | bias
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            else:
                module, kind = name.rsplit(".", 1)
                if module not in block:
                    raise ValueError(f"state_dict has an unknown OpenAI block key {key!r}")
                out[f"{layer}{block[module]}.{kind}"] = value
    return out


def check_hf_tokenizer(tokenizer: Any) -> None:
    """Raise a ValueError if a Hugging Face CLIP tokenizer is not a working BPE tokenizer.

    Offline, ``CLIPTokenizer.from_pretrained(name)`` can return a tokenizer with a 2-token vocabulary
    that maps every word to the same id, and retrieval then trains on noise. This check catches it
    (vocabulary < 1000 entries, or different words getting the same ids).
    """
    size = len(tokenizer)
    probe = tokenizer(["a photo of a cat", "the dog runs"], add_special_tokens=False)["input_ids"]
    if size < 1000 or probe[0] == probe[1] or len(set(probe[0])) < 2:
        raise ValueError(
            f"tokenizer is broken: {type(tokenizer).__name__} has {size} vocabulary entries and encodes "
            f"'a photo of a cat' as {probe[0]} and 'the dog runs' as {probe[1]}. This is what "
            "CLIPTokenizer.from_pretrained returns when its vocabulary files could not be loaded (e.g. offline). "
            "Use muse_pyramid.backbones.clip_tokenize without a tokenizer (open_clip's bundled vocabulary), "
            "or from_pretrained on a local folder holding vocab.json and merges.txt"
        )
