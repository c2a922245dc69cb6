"""muse-pyramid: MUSE (multi-scale Mamba) heads for CLIP-based text-video retrieval.

    >>> from muse_pyramid import MUSEHead, pool_video
    >>> head = MUSEHead(512)                      # ViT-B CLIP width
    >>> frames = head(tokens, frame_mask)         # (B, T, 1+H*W, 512) -> (B, T, 512)
    >>> video = pool_video(frames, frame_mask)    # (B, 512), unit norm

Backbone adapters live in `muse_pyramid.backbones` (imported on demand), kernels in `muse_pyramid.ops`.
"""

from ._version import __version__
from .aggregate import AggregatedSequence, ScaleAggregator
from .block import AttentionMixer, ResMambaBlock
from .config import MUSEConfig
from .convert import ConversionReport, convert_release_state_dict, load_release_checkpoint
from .head import MUSEHead, pool_video
from .mamba import BiMamba
from .pyramid import FeaturePyramid, LayerNorm2d, PyramidLevel

__all__ = [
    "__version__",
    "AggregatedSequence",
    "AttentionMixer",
    "BiMamba",
    "ConversionReport",
    "FeaturePyramid",
    "LayerNorm2d",
    "MUSEConfig",
    "MUSEHead",
    "PyramidLevel",
    "ResMambaBlock",
    "ScaleAggregator",
    "convert_release_state_dict",
    "load_release_checkpoint",
    "pool_video",
]
