"""Training and evaluation from a feature cache (``--frozen_clip --cache_dir``).

The training loop is the online one (`train.train`): the same loss, optimiser groups, schedule,
checkpoints and evaluation. Only the inputs change: `CachedRetrievalDataset` gives each step the
stored token maps and text features, CLIP's weights are frozen (`CLIP4Clip.freeze_clip`, so its optimiser group
holds only the logit scale, still trained at `lr * coef_lr`), and `CLIP4Clip` runs just the head.
Tests: tests/examples/test_cache_training.py.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..distributed import DistInfo
from .dataset import RUN_KEYS, CachedRetrievalDataset, check_settings, load_manifest
from .format import CacheMismatchError
from .run import run_settings

__all__ = ["evaluate_cache", "cached_splits", "eval_settings"]

logger = logging.getLogger(__name__)

#: Settings compared when a checkpoint is evaluated from a cache: the CLIP source is the checkpoint's own.
EVAL_KEYS = tuple(k for k in RUN_KEYS if k not in ("backbone", "weights"))


@torch.no_grad()
def evaluate_cache(model: nn.Module, dataset: CachedRetrievalDataset, info: DistInfo, *, batch_size: int = 16,
                   num_workers: int = 0, dsl: bool = False, chunk_size: int = 4096, progress: bool = True,
                   desc: str = "eval") -> Dict[str, Any]:
    """`evaluate.evaluate_samples` on a cached split: each clip's stored tokens through the head once."""
    from ..encode import encode_videos, score_embeddings

    video = encode_videos(model, dataset.clips(), info, batch_size=batch_size, num_workers=num_workers,
                          progress=progress, desc=f"{desc} videos")
    was_training = model.training
    model.eval()
    text = model.encode_text(dataset.text_features().to(info.device)).float()
    model.train(was_training)
    gt = torch.tensor(dataset.sample_clip, dtype=torch.long)
    return score_embeddings(model, text, video, gt, skipped=len(dataset.skipped), dsl=dsl, chunk_size=chunk_size)


def eval_settings(args: argparse.Namespace, model: nn.Module, cache_dir: str,
                  model_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Check that `model` may be evaluated from the cache; returns the run settings compared.

    A model built from the flags must match the cache fully (`RUN_KEYS`). A checkpoint is accepted
    only if it was trained with ``--frozen_clip`` from CLIP weights equal to the cache's (its
    ``model_config["frozen_clip_weights"]``): a fine-tuned CLIP would see stale token maps.
    """
    manifest = load_manifest(cache_dir)
    settings = run_settings(args, model.clip, weights=model_config is None)
    if model_config is None:
        check_settings(manifest, settings, cache_dir=cache_dir)
        return settings
    check_settings(manifest, settings, cache_dir=cache_dir, keys=EVAL_KEYS)
    trained_from = model_config.get("frozen_clip_weights")
    cached = manifest["settings"].get("weights")
    if trained_from != cached:
        why = ("its CLIP was fine-tuned (not trained with --frozen_clip)" if trained_from is None
               else f"it was trained from CLIP weights {trained_from}, the cache holds {cached}")
        raise CacheMismatchError(f"the model cannot be evaluated from the cache {cache_dir}: {why}; evaluate it "
                                 "online (--data_path / --features_path without --cache_dir)")
    return settings


def cached_splits(args: argparse.Namespace, model: nn.Module, info: DistInfo
                  ) -> Tuple[CachedRetrievalDataset, Callable[[str, bool], Dict[str, Any]], bool]:
    """Training set, an evaluation function `(split, dsl) -> result` and whether to select on val.

    Raises `CacheMismatchError` when the cache was built with other settings than `args`.
    """
    from ..encode import same_samples

    settings = run_settings(args, model.clip)
    args.frozen_clip_weights = settings["weights"]  # recorded in checkpoints (see build.model_config)
    verify = bool(getattr(args, "verify_cache", False))
    train_ds = CachedRetrievalDataset(args.cache_dir, "train", settings=settings, verify=verify)
    splits = {"test": CachedRetrievalDataset(args.cache_dir, "test", settings=settings, verify=verify)}
    select_on_val = False
    if args.do_val and "val" in load_manifest(args.cache_dir)["splits"]:
        splits["val"] = CachedRetrievalDataset(args.cache_dir, "val", settings=settings, verify=verify)
        select_on_val = not same_samples(splits["val"].samples, splits["test"].samples)
        if not select_on_val:
            logger.warning("the validation split is the test split: no model selection on it (the last epoch is "
                           "kept); cache a held-out --val_csv to select on validation")

    def evaluate(split: str, dsl: bool) -> Dict[str, Any]:
        return evaluate_cache(model, splits[split], info, batch_size=args.batch_size_val,
                              num_workers=args.num_workers, dsl=dsl, progress=not args.no_progress, desc=split)

    return train_ds, evaluate, select_on_val
