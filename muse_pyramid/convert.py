"""Load checkpoints of the public MUSE release into a `MUSEHead`.

The release (built on CLIP4Clip) stores, for block i,

    MS_mamba.{i}.mamba.{A_log, D, A_b_log, D_b, in_proj.weight, conv1d.weight, conv1d.bias,
                        x_proj.weight, dt_proj.weight, dt_proj.bias, conv1d_b.*, x_proj_b.weight,
                        dt_proj_b.*, out_proj.weight}
    MS_mamba.{i}.layer_norm1.{weight, bias}
    MS_mamba.{i}.temporal_fc.{weight, bias}

often under a `module.` prefix and beside the whole CLIP (`clip.*`). It holds no pyramid weights: the
release kept the pyramid in a plain Python list, so it was never trained nor saved. The converter says
so and leaves the pyramid as initialised, unless a second source for it is given.
Tests: `tests/test_convert.py`.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Union

import torch

from .head import MUSEHead

__all__ = ["ConversionReport", "convert_release_state_dict", "load_release_checkpoint"]

logger = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"^MS_mamba\.(\d+)\.(mamba|layer_norm1|temporal_fc)\.(.+)$")
_RENAME = {"mamba": "mixer", "layer_norm1": "norm", "temporal_fc": "proj"}

StateDict = Dict[str, torch.Tensor]


@dataclass
class ConversionReport:
    """What a conversion did: keys loaded, keys of the head left as initialised, keys ignored."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    pyramid_loaded: bool = False

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors into the head"]
        if not self.pyramid_loaded:
            lines.append("pyramid: not in the release checkpoint (never registered there); left as initialised")
        if self.missing:
            lines.append(f"left as initialised: {len(self.missing)} tensors, e.g. {self.missing[:3]}")
        if self.ignored:
            lines.append(f"ignored (not part of the head): {len(self.ignored)} tensors, e.g. {self.ignored[:3]}")
        return "; ".join(lines)


def _strip_module(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def convert_release_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple:
    """Rename the release's block keys to this library's names.

    Args:
        state_dict: the release's (possibly `module.`-prefixed, possibly whole-model) state dict.

    Returns:
        `(head_state_dict, ignored_keys)`: `blocks.{i}.{mixer,norm,proj}.*` tensors, and every key that
        is not part of the head (CLIP's weights, for example).
    """
    out: StateDict = {}
    ignored: List[str] = []
    for key, value in _strip_module(state_dict).items():
        m = _BLOCK_KEY.match(key)
        if m is None:
            ignored.append(key)
            continue
        out[f"blocks.{m.group(1)}.{_RENAME[m.group(2)]}.{m.group(3)}"] = value
    return out, ignored


def _load(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> StateDict:
    """A state dict from a mapping or a checkpoint file; a file that is missing, truncated or of another
    kind raises `FileNotFoundError` / `ValueError` naming it."""
    if isinstance(source, Mapping):
        sd = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, AttributeError, KeyError,
                IndexError, TypeError) as err:
            detail = " ".join(str(err).split())[:200]
            raise ValueError(f"cannot read the checkpoint {path}: it is truncated, damaged or not a PyTorch file "
                             f"({type(err).__name__}: {detail})") from err
        if not isinstance(sd, Mapping):
            raise ValueError(f"the checkpoint {path} holds a {type(sd).__name__}, not a state dict")
    else:
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = dict(sd[wrapper])
    bad = [k for k, v in sd.items() if "MS_mamba." in str(k) and not isinstance(v, torch.Tensor)]
    if bad:
        name = "source" if isinstance(source, Mapping) else os.fspath(source)
        raise ValueError(f"{name} is not a state dict of tensors: {bad[:3]} hold no tensor")
    return sd


def load_release_checkpoint(
    head: MUSEHead,
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    pyramid_source: Optional[Union[str, os.PathLike, Mapping[str, torch.Tensor]]] = None,
    strict: bool = True,
) -> ConversionReport:
    """Load a release checkpoint (path or state dict) into `head`, in place.

    Args:
        head: a `MUSEHead` whose depth and width match the checkpoint.
        source: the release checkpoint (`pytorch_model.bin.N`) or its state dict.
        pyramid_source: optional state dict (or path) with `pyramid.*` or `levels.*` keys for the pyramid.
        strict: raise a `ValueError` when the checkpoint has no block weights, or a block key or shape
            does not match the head.

    Returns:
        A `ConversionReport`; its `str()` is also logged.
    """
    converted, ignored = convert_release_state_dict(_load(source))
    if strict and not converted:
        raise ValueError(
            "source holds no MUSE block weights (no 'MS_mamba.{i}.*' keys); got keys like "
            f"{ignored[:5]}"
        )
    target = head.state_dict()
    report = ConversionReport(ignored=ignored)
    if pyramid_source is not None:
        pyr = _strip_module(_load(pyramid_source))
        for key, value in pyr.items():
            name = key if key.startswith("pyramid.") else f"pyramid.{key}"
            converted[name] = value
        report.pyramid_loaded = True
    for key, value in converted.items():
        if key not in target:
            if strict:
                raise ValueError(f"checkpoint key {key!r} has no counterpart in the head (depth {len(head.blocks)})")
            report.ignored.append(key)
            continue
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, head expects {tuple(target[key].shape)}")
        report.loaded.append(key)
    report.missing = sorted(k for k in target if k not in converted)
    if strict:
        missing_blocks = [k for k in report.missing if k.startswith("blocks.")]
        if missing_blocks:
            raise ValueError(f"checkpoint lacks block tensors the head needs: {missing_blocks[:5]}")
    head.load_state_dict({k: converted[k] for k in report.loaded}, strict=False)
    logger.info("load_release_checkpoint: %s", report)
    return report
