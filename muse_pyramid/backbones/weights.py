"""Local CLIP weights: find OpenAI's files, read them, and load them into a model of any family.

OpenAI's ``ViT-B-32.pt`` / ``ViT-B-16.pt`` / ... are TorchScript archives. ``torch.load(...,
weights_only=True)`` refuses them; ``torch.jit.load(path).state_dict()`` reads them (TorchScript
holds code as TorchScript, not pickled Python objects). The state dict they give uses OpenAI's key
names (``visual.conv1.weight``, ``visual.transformer.resblocks.0.attn.in_proj_weight``, ...,
``visual.proj``), its tensors are mostly float16, and it carries three extra entries
(``input_resolution``, ``context_length``, ``vocab_size``) that mark it as an OpenAI release.
Those weights need QuickGELU (see `check_quick_gelu`).

No network access: files come from a folder the user names (argument or ``MUSE_PYRAMID_CLIP_DIR``).

Tests: ``tests/backbones/test_weights.py``.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from ._common import check_quick_gelu, require

__all__ = [
    "OPENAI_SENTINEL_KEYS",
    "WEIGHTS_DIR_ENV",
    "is_openai_release",
    "load_openai_state_dict",
    "load_openai_weights",
    "resolve_openai_weights",
]

logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "MUSE_PYRAMID_CLIP_DIR"
# Entries that OpenAI's archives hold besides the weights (OpenAI's own `build_model` drops them).
OPENAI_SENTINEL_KEYS = ("input_resolution", "context_length", "vocab_size")
# File stems of OpenAI's releases, as in the download URLs of OpenAI's clip.py.
OPENAI_FILES = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336px")


def _openai_file_name(name: str) -> Optional[str]:
    """``ViT-B/32``, ``ViT-B-32``, ``ViT-L/14@336px``, ``ViT-L/14-336``, ``ViT-B-32-quickgelu`` -> file name."""
    stem = name.strip()
    for suffix in (".pt", "-quickgelu"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = stem.replace("/", "-").replace("@", "-")
    if stem.endswith("-336"):
        stem += "px"
    by_lower = {f.lower(): f for f in OPENAI_FILES}
    found = by_lower.get(stem.lower())
    return f"{found}.pt" if found else None


def resolve_openai_weights(
    name_or_path: Union[str, os.PathLike], weights_dir: Optional[Union[str, os.PathLike]] = None
) -> Path:
    """Local file of an OpenAI CLIP release.

    Args:
        name_or_path: an existing file (returned as is), or a model name: ``"ViT-B/32"``,
            ``"ViT-B/16"``, ``"ViT-L/14"``, ``"ViT-L/14@336px"`` (also ``"ViT-L/14-336"``),
            ``"RN50"``, ... or the file name itself (``"ViT-B-32.pt"``).
        weights_dir: folder holding OpenAI's files under their release names (``ViT-B-32.pt``);
            defaults to the environment variable ``MUSE_PYRAMID_CLIP_DIR``.

    Raises:
        FileNotFoundError: naming the file that was expected and where.
        ValueError: for a name that is neither a file nor a known release.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    file_name = _openai_file_name(str(name_or_path))
    if file_name is None:
        known = ", ".join(f"'{f}'" for f in OPENAI_FILES)
        raise ValueError(
            f"name_or_path={str(name_or_path)!r} is neither an existing file nor an OpenAI CLIP release; "
            f"known releases: {known} (also written with '/' and '@', e.g. 'ViT-B/32', 'ViT-L/14@336px')"
        )
    folder = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        raise FileNotFoundError(
            f"no folder given for the CLIP weights: expected the file '{file_name}' in a folder passed as "
            f"weights_dir=... or named by the environment variable {WEIGHTS_DIR_ENV}"
        )
    candidate = Path(folder).expanduser() / file_name
    if not candidate.is_file():
        raise FileNotFoundError(
            f"expected OpenAI's '{file_name}' for {str(name_or_path)!r} at {candidate}, which does not exist "
            "(this library never downloads weights; copy the release file there)"
        )
    return candidate


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl`` and a ``code/`` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_openai_state_dict(
    path: Union[str, os.PathLike], prefix: Optional[str] = None
) -> Dict[str, torch.Tensor]:
    """Read CLIP weights in OpenAI's layout from a local file, on CPU.

    Reads OpenAI's TorchScript archives (``torch.jit.load(...).state_dict()``), plain state dicts
    saved with ``torch.save`` (read with ``weights_only=True``; a ``{"state_dict": ...}`` wrapper
    is unwrapped) and ``.safetensors`` files. A leading ``module.`` (DistributedDataParallel) is
    stripped from every key.

    Args:
        path: the file.
        prefix: keep only keys under this prefix and strip it, e.g. ``"clip."`` for a CLIP4Clip
            checkpoint whose CLIP lives in ``model.clip``.

    Returns:
        The state dict with OpenAI's key names and the file's dtypes (OpenAI's releases are mostly
        float16). Entries of an OpenAI release's archive besides the weights
        (`OPENAI_SENTINEL_KEYS`) are kept so that `is_openai_release` can recognise it;
        `build_open_clip_from_openai` and `load_openai_weights` drop them.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such file")
    if _is_torchscript_archive(path):
        with warnings.catch_warnings():  # recent torch marks TorchScript as deprecated; the archives remain
            warnings.simplefilter("ignore", FutureWarning)
            state_dict = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    elif path.suffix == ".safetensors":
        state_dict = dict(require("safetensors.torch").load_file(str(path), device="cpu"))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
        if not isinstance(state_dict, dict):
            raise TypeError(f"path={str(path)!r} holds a {type(state_dict).__name__}, expected a state dict")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if prefix is not None:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ValueError(f"prefix={prefix!r} matches no key of {str(path)!r}")
    return state_dict


def is_openai_release(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True if the state dict comes from one of OpenAI's archives (it holds `OPENAI_SENTINEL_KEYS`)."""
    return any(k in state_dict for k in OPENAI_SENTINEL_KEYS)


def strip_sentinels(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict without `OPENAI_SENTINEL_KEYS`."""
    return {k: v for k, v in state_dict.items() if k not in OPENAI_SENTINEL_KEYS}


def check_openai_vit(state_dict: Dict[str, torch.Tensor]) -> None:
    """Raise a ValueError unless `state_dict` is an OpenAI-layout CLIP ViT."""
    missing = [k for k in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj") if k not in state_dict]
    if missing:
        some = ", ".join(list(state_dict)[:5])
        raise ValueError(
            f"state_dict is not an OpenAI-layout CLIP ViT: missing {missing} (its first keys: {some}); "
            "ResNet CLIPs have no token map and are not supported"
        )


def load_openai_weights(
    model: nn.Module, state_dict: Dict[str, torch.Tensor], *, quick_gelu: Optional[bool] = None, strict: bool = True
) -> nn.Module:
    """Load OpenAI-layout CLIP weights into an existing model of any supported family.

    Accepts an open_clip ``CLIP`` (or its ``.visual``), a timm CLIP ``VisionTransformer``, a Hugging
    Face ``CLIPVisionModelWithProjection`` / ``CLIPModel`` (vision tower only) or an OpenAI-layout
    module (OpenAI's or CLIP4Clip's ``CLIP``). Tensors are cast to the model's dtype.

    Args:
        model: the model to fill, in place.
        state_dict: from `load_openai_state_dict`.
        quick_gelu: whether the weights were trained with QuickGELU; None = yes for an OpenAI release
            (`is_openai_release`), unchecked otherwise. A mismatch with the model's activation warns
            (`QuickGELUMismatchWarning`).
        strict: fail on missing or unexpected keys (for a vision-only model, the text weights of the
            state dict are skipped, not unexpected).

    Returns:
        `model`.
    """
    check_openai_vit(state_dict)
    expected = quick_gelu if quick_gelu is not None else (True if is_openai_release(state_dict) else None)
    if expected is not None:
        check_quick_gelu(model, expected)
    state_dict = strip_sentinels(state_dict)
    family = type(model).__module__.split(".")[0]
    if family == "timm":
        from .timm_clip import openai_to_timm_state_dict

        target = openai_to_timm_state_dict(state_dict, model)
    elif family == "transformers":
        from .hf_clip import openai_to_hf_state_dict

        target = openai_to_hf_state_dict(state_dict, model)
    elif hasattr(model, "visual"):
        target = state_dict  # open_clip CLIP, OpenAI/CLIP4Clip CLIP: same key names
    elif hasattr(model, "conv1") and hasattr(model, "proj"):
        target = {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
    else:
        raise TypeError(
            f"model is a {type(model).__name__}; expected an open_clip CLIP (or its .visual), a timm "
            "VisionTransformer, a Hugging Face CLIPVisionModelWithProjection/CLIPModel or an OpenAI-layout CLIP"
        )
    own = model.state_dict()
    unexpected = [k for k in target if k not in own]
    missing = [k for k in own if k not in target and k not in OPENAI_SENTINEL_KEYS and not k.endswith("position_ids")]
    if family == "transformers":  # the text tower of a CLIPModel is not filled
        missing = [k for k in missing if k.startswith(("vision_model.", "visual_projection."))]
    if strict and (missing or unexpected):
        raise ValueError(
            f"state_dict does not fit {type(model).__name__}: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]} (is the architecture the same as the weights'?)"
        )
    # Checked above, so a non-strict load here only skips what was meant to be skipped.
    target = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in target.items() if k in own}
    model.load_state_dict(target, strict=False)
    return model
