"""Benchmark readers: one module per data set, each with ``load_split``, ``scan`` and ``DEFAULTS``."""

from ..video import FrameConfig
from . import activitynet, didemo, lsmdc, msrvtt, msvd
from .base import RetrievalDataset, Sample, SplitReport, group_by_video

DATASETS = {"msrvtt": msrvtt, "didemo": didemo, "activitynet": activitynet, "msvd": msvd, "lsmdc": lsmdc}

__all__ = ["DATASETS", "FrameConfig", "RetrievalDataset", "Sample", "SplitReport", "group_by_video"]
