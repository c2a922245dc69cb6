"""Helpers shared by the backbone adapters: lazy imports with a named extra, input checks,
and the GELU/QuickGELU check.

OpenAI's CLIP weights were trained with QuickGELU (``x * sigmoid(1.702 x)``). Loading them into a
model built with exact GELU raises no error and silently gives different features, so every loader
here checks the activation of the model it fills (`check_quick_gelu`).

Tests: ``tests/backbones/test_weights.py``, ``tests/backbones/test_extras.py``.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from types import ModuleType
from typing import Optional

import torch
from einops import rearrange, repeat
from torch import nn

from .._validate import check_tensor

__all__ = ["QuickGELUMismatchWarning", "check_quick_gelu", "uses_quick_gelu"]

logger = logging.getLogger(__name__)

# The pip extra that installs each optional backbone library.
EXTRAS = {"open_clip": "openclip", "timm": "timm", "transformers": "hf", "safetensors": "examples"}


def require(module: str) -> ModuleType:
    """Import an optional dependency, or raise an ImportError that names the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS.get(module.split(".")[0])
        hint = f"pip install 'muse-pyramid[{extra}]'" if extra else f"pip install {module}"
        raise ImportError(f"this function needs the optional package '{module}': {hint}") from err


def check_images(images: object, name: str = "images") -> torch.Tensor:
    """Check an image batch `(N, 3, H, W)`."""
    images = check_tensor(name, images, 4, "(N, 3, H, W)")
    if images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W) with 3 channels, got shape {tuple(images.shape)}")
    return images


def embed_patches(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """OpenAI-style ViT input: ``conv1`` patches, the class token first, plus ``positional_embedding``.

    Args:
        visual: a vision tower with OpenAI's ``conv1`` / ``class_embedding`` / ``positional_embedding``
            (OpenAI, CLIP4Clip, open_clip).
        images: `(N, 3, H, W)` in the dtype of ``conv1``.

    Returns:
        `(N, 1+H'*W', width)`, before ``ln_pre``.
    """
    x = rearrange(visual.conv1(images), "n d h w -> n (h w) d")
    cls = repeat(visual.class_embedding, "d -> n 1 d", n=x.shape[0]).to(x.dtype)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


class QuickGELUMismatchWarning(UserWarning):
    """Weights trained with one activation (QuickGELU or GELU) were loaded into a model using the other."""


def uses_quick_gelu(model: nn.Module) -> Optional[bool]:
    """Whether the MLPs of a CLIP model (any family) use QuickGELU.

    Returns True if any submodule is a QuickGELU (open_clip, timm and OpenAI's ``QuickGELU``, Hugging
    Face's ``QuickGELUActivation``; also inside a TorchScript archive), False if the model only has
    GELU modules, None if it has neither (e.g. a functional activation), i.e. unknown.
    """
    # TorchScript modules keep the Python class name as `original_name`.
    names = {getattr(m, "original_name", type(m).__name__) for m in model.modules()}
    if any("QuickGELU" in n for n in names):
        return True
    if any("GELU" in n for n in names):
        return False
    return None


def check_quick_gelu(model: nn.Module, expected: bool = True, *, strict: bool = False) -> bool:
    """Check that `model` uses the activation its weights were trained with.

    Args:
        model: any CLIP model or vision tower (open_clip, timm, Hugging Face, OpenAI layout).
        expected: True for weights trained with QuickGELU (all of OpenAI's CLIP releases).
        strict: raise a ValueError on a mismatch instead of warning.

    Returns:
        False when the activation is known and differs (after warning with
        `QuickGELUMismatchWarning`), True otherwise (match, or unknown activation).
    """
    actual = uses_quick_gelu(model)
    if actual is None:
        logger.debug("could not tell whether %s uses QuickGELU; activation not checked", type(model).__name__)
        return True
    if actual == expected:
        return True
    want, got = ("QuickGELU", "GELU") if expected else ("GELU", "QuickGELU")
    message = (
        f"the weights were trained with {want} but the model ({type(model).__name__}) uses {got}: "
        "loading gives no error but wrong features. "
    )
    if expected:
        message += (
            "Build the model with QuickGELU (open_clip: a '-quickgelu' model name or quick_gelu=True; "
            "timm: a '*_clip_quickgelu_*' model; Hugging Face: hidden_act='quick_gelu')."
        )
    else:
        message += "Build the model with GELU (open_clip: quick_gelu=False; timm: a '*_clip_*' model without quickgelu)."
    if strict:
        raise ValueError(message)
    warnings.warn(message, QuickGELUMismatchWarning, stacklevel=3)
    return False
