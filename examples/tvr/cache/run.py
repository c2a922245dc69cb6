"""The cache command: build a data set's feature cache from the command-line flags of the pipeline.

    python examples/clip4clip_msrvtt.py cache --data_path ... --features_path ... --cache_dir /cache/msrvtt
    torchrun --nproc_per_node 8 examples/clip4clip_msrvtt.py cache ...   # each process writes its shards

`run_settings` is also what a training run compares with the manifest before it reads a cache.
Tests: tests/examples/test_cache.py.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from ..distributed import DistInfo
from .format import sha256_file
from .writer import ShardHook, build_cache, frame_settings

__all__ = ["TOKENIZER", "weights_identity", "backbone_identity", "architecture", "run_settings",
           "build_cache_from_args"]

logger = logging.getLogger(__name__)

TOKENIZER = "clip-bpe-49408"  # muse_pyramid.backbones.clip_tokenize: [start] + words[: max_words - 2] + [end]


def weights_identity(args: argparse.Namespace) -> str:
    """``sha256:<hex>`` of the CLIP weights file, or ``random-init:<seed>`` for a random-initialised CLIP;
    ``+ init_model sha256:<hex>`` when ``--init_model`` overrides them."""
    if getattr(args, "small_clip", None) is not None or getattr(args, "random_init_clip", False):
        out = f"random-init:{args.seed}"
    else:
        from muse_pyramid.backbones import resolve_openai_weights

        out = "sha256:" + sha256_file(resolve_openai_weights(args.pretrained_clip_name, args.clip_weights_dir))
    if getattr(args, "init_model", None):
        out += " + init_model sha256:" + sha256_file(args.init_model)
    return out


def backbone_identity(args: argparse.Namespace) -> str:
    """Where CLIP comes from: ``ViT-B/32``, a weights path, or ``small_clip {...}``."""
    small = getattr(args, "small_clip", None)
    return f"small_clip {json.dumps(small, sort_keys=True)}" if small is not None else str(args.pretrained_clip_name)


def architecture(clip: nn.Module) -> str:
    """CLIP's vision tower as read from the module, e.g. ``open_clip ViT 768x12, patch 32, 224 px, D 512``."""
    v = clip.visual
    size = v.image_size[0] if isinstance(v.image_size, (tuple, list)) else v.image_size
    dim = v.proj.shape[1] if v.proj is not None else v.output_dim
    return (f"open_clip ViT {v.conv1.out_channels}x{len(v.transformer.resblocks)}, patch {v.conv1.kernel_size[0]}, "
            f"{size} px, D {dim}")


def run_settings(args: argparse.Namespace, clip: nn.Module, *, weights: bool = True) -> Dict[str, Any]:
    """The settings of a run that its cache must share (see `dataset.RUN_KEYS`).

    `weights=False` leaves out the weights identity (no file is hashed).
    """
    from ..build import data_options, frame_config

    return {
        "dataset": args.dataset,
        "data_options": {k: str(v) if isinstance(v, Path) else v for k, v in data_options(args).items()},
        "backbone": backbone_identity(args),
        "architecture": architecture(clip),
        "weights": weights_identity(args) if weights else None,
        **frame_settings(frame_config(args, clip)),
        "max_words": int(args.max_words),
        "tokenizer": TOKENIZER,
    }


def build_cache_from_args(args: argparse.Namespace, info: DistInfo, *, on_shard: Optional[ShardHook] = None,
                          splits: Optional[List[str]] = None) -> Dict[str, Any]:
    """Build the cache of `args.dataset` in `args.cache_dir` with the run's CLIP; returns the manifest.

    CLIP is built exactly as a training run builds it (`seed_everything(seed)` then the model), so a
    random-initialised CLIP (``--random_init_clip`` / ``--small_clip``) is the same one. Splits: train,
    test, and val unless it is the test split (recorded as an alias) or ``--no_val``.
    """
    from ..build import build_model_from_args, frame_config, load_model_state, load_samples, make_tokenizer
    from ..data.base import RetrievalDataset
    from ..encode import same_samples
    from ..runtime import autocast_context, seed_everything

    if not getattr(args, "cache_dir", None):
        raise ValueError("the cache command needs --cache_dir (the folder to write the cache to)")
    seed_everything(args.seed)
    model = build_model_from_args(args)
    if getattr(args, "init_model", None):  # as training does: CLIP's weights from the checkpoint
        model.load_state_dict(load_model_state(args.init_model)[0], strict=False)
    clip = model.clip.to(info.device)
    for p in clip.parameters():
        p.requires_grad_(False)
    settings = run_settings(args, clip)
    settings["encode_precision"] = args.precision
    frames = frame_config(args, clip)
    tokenize = make_tokenizer(args.max_words)

    wanted = splits or ["train", "val", "test"]
    if not getattr(args, "do_val", True) and splits is None:
        wanted.remove("val")
    samples, skipped, aliases = {}, {}, {}
    for split in wanted:
        ds = RetrievalDataset(load_samples(args, split), tokenize, frames, skip_broken=args.skip_broken_videos)
        samples[split] = ds.samples
        skipped[split] = sorted({str(s.video_path) for s, _ in ds.skipped})
    if "val" in samples and "test" in samples and same_samples(samples["val"], samples["test"]):
        del samples["val"]
        aliases["val"] = "test"
    return build_cache(
        clip, samples, args.cache_dir, settings, frames=frames, tokenize=tokenize, info=info, aliases=aliases,
        skipped=skipped, shard_clips=args.cache_shard_clips, shard_texts=args.cache_shard_texts,
        batch_size=args.batch_size_val, num_workers=args.num_workers, frame_chunk_size=args.frame_chunk_size,
        autocast=lambda: autocast_context(args.precision, info.device), progress=not args.no_progress,
        on_shard=on_shard,
    )
