"""`MUSEConfig`: every default of the MUSE head in one place.

The modules take explicit arguments, and their keyword defaults read the fields of this class
(`d_state: int = MUSEConfig.d_state`), so every default lives here and nowhere else
(`tests/test_config.py` checks each module's signature). The dataclass is also the one boundary where a
head is described as data (saved in checkpoints, rebuilt with `MUSEHead.from_config`). Defaults follow
the paper (Tang et al., AAAI 2025) and `docs/architecture.md`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Literal, Mapping, Optional, Tuple

__all__ = ["MUSEConfig", "AGGREGATIONS", "MIXERS", "SCALES"]

AggregationMode = Literal["scale_wise", "frame_wise", "spatial_wise"]
MixerType = Literal["bimamba", "mamba", "attention"]

#: Token orders the aggregator knows (paper Sec. 3.2 and its ablation).
AGGREGATIONS: Tuple[str, ...] = ("scale_wise", "frame_wise", "spatial_wise")
#: Sequence mixers a block can use: bidirectional Mamba (paper), forward-only Mamba, self-attention.
MIXERS: Tuple[str, ...] = ("bimamba", "mamba", "attention")
#: Scale factors the simple feature pyramid supports (ViTDet).
SCALES: Tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class MUSEConfig:
    """Hyper-parameters of a `MUSEHead`; field defaults are the paper's."""

    dim: int = 512  # token width C (CLIP's projection width: 512 for ViT-B, 768 for ViT-L)
    scales: Tuple[float, ...] = (0.5, 1.0, 2.0)  # pyramid scale factors, in sequence order
    depth: int = 4  # number of ResMamba blocks
    aggregation: AggregationMode = "scale_wise"  # token order fed to the mixer
    mixer: MixerType = "bimamba"  # sequence mixer inside each block
    d_state: int = 16  # SSM state size N
    d_conv: int = 4  # causal depthwise conv width
    expand: int = 1  # d_inner = expand * dim
    dt_rank: Any = "auto"  # "auto" = ceil(dim / 16), or an int
    dropout: float = 0.1  # dropout of the last block; linearly spaced from 0 over the blocks
    num_heads: int = 8  # heads of the attention mixer (ablation only)
    trainable_pyramid: bool = True  # False freezes the pyramid, as the public release did by accident
    grid: Optional[Tuple[int, int]] = None  # (H, W) of the patch grid when it is not square

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if self.grid is not None:
            grid = tuple(self.grid) if isinstance(self.grid, (tuple, list)) else None
            if grid is None or len(grid) != 2 or not all(isinstance(v, int) and v > 0 for v in grid):
                raise ValueError(f"grid must be None or (H, W) with two positive ints, got {self.grid!r}")
            self.grid = grid

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (lists for tuples) that `torch.load(weights_only=True)` and JSON accept."""
        out = asdict(self)
        out["scales"] = list(self.scales)
        out["grid"] = list(self.grid) if self.grid is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MUSEConfig:
        """Build from a dict; unknown keys raise a `ValueError` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MUSEConfig got unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))
