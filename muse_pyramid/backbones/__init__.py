"""Backbone adapters: the last-layer CLIP token map MUSE needs, from any CLIP implementation.

Every ``*_tokens`` function returns ``(N, 1+H*W, D)``: the CLS token first, then the patch tokens
row-major, after the final LayerNorm (``ln_post``) AND the visual projection, so row 0 equals the
library's own pooled image embedding. `encode_video` turns frames ``(B, T, 3, H, W)`` into the
``(B, T, 1+H*W, D)`` input of `muse_pyramid.MUSEHead`.

| source                               | tokens               | extra                        |
|--------------------------------------|----------------------|------------------------------|
| open_clip ``CLIP``                   | `open_clip_tokens`   | ``muse-pyramid[openclip]``  |
| Hugging Face ``CLIPModel`` & co.     | `hf_clip_tokens`     | ``muse-pyramid[hf]``         |
| timm ``vit_*_clip_*``                | `timm_clip_tokens`   | ``muse-pyramid[timm]``       |
| OpenAI / CLIP4Clip ``CLIP`` module   | `openai_clip_tokens` | none                         |

The backbone libraries are imported only inside the functions that use them; a missing one raises
an ImportError naming the extra. See ``docs/integration.md``. Tests: ``tests/backbones/``.
"""

from ._common import QuickGELUMismatchWarning, check_quick_gelu, uses_quick_gelu
from .hf_clip import check_hf_tokenizer, hf_clip_tokens, openai_to_hf_state_dict
from .openai_clip import openai_clip_tokens
from .openclip import build_open_clip_from_openai, open_clip_tokens
from .text import clip_tokenize, open_clip_text_features
from .timm_clip import openai_to_timm_state_dict, timm_clip_tokens
from .video import encode_video
from .weights import (
    WEIGHTS_DIR_ENV,
    is_openai_release,
    load_openai_state_dict,
    load_openai_weights,
    resolve_openai_weights,
)

__all__ = [
    "WEIGHTS_DIR_ENV",
    "QuickGELUMismatchWarning",
    "build_open_clip_from_openai",
    "check_hf_tokenizer",
    "check_quick_gelu",
    "clip_tokenize",
    "encode_video",
    "hf_clip_tokens",
    "is_openai_release",
    "load_openai_state_dict",
    "load_openai_weights",
    "open_clip_text_features",
    "open_clip_tokens",
    "openai_clip_tokens",
    "openai_to_hf_state_dict",
    "openai_to_timm_state_dict",
    "resolve_openai_weights",
    "timm_clip_tokens",
    "uses_quick_gelu",
]
