"""Encode once, score once: the embeddings of a split's videos and texts, and their retrieval metrics.

Shared by evaluation (`evaluate.py`), training's per-epoch validation and the feature cache
(`cache/training.py`), which is why it depends on none of them. Shape letters: Nt = texts, Nv = distinct
videos, D = embedding width.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.distributed as dist

from .distributed import DistInfo, make_loader
from .metrics import chunked_similarity, compute_metrics, dual_softmax
from .model import CLIP4Clip

__all__ = ["encode_texts", "encode_videos", "same_samples", "score_embeddings"]

logger = logging.getLogger(__name__)


def same_samples(a: Sequence, b: Sequence) -> bool:
    """True when two splits hold the same (video, text) pairs, e.g. MSR-VTT's val defaulting to test."""
    key = lambda s: (s.video_id, s.text, s.start, s.end)  # noqa: E731
    return sorted(map(key, a)) == sorted(map(key, b))


def _gather_rows(index: torch.Tensor, rows: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """Place `rows (n, D)` at positions `index (n,)` of a `(total, D)` tensor, merged over processes."""
    if info.distributed:
        sizes = [torch.zeros((), dtype=torch.long, device=rows.device) for _ in range(info.world_size)]
        dist.all_gather(sizes, torch.tensor(rows.shape[0], device=rows.device))
        n_max = int(max(int(s) for s in sizes))
        pad_rows = rows.new_zeros(n_max, rows.shape[1])
        pad_rows[: rows.shape[0]] = rows
        pad_index = index.new_full((n_max,), -1)
        pad_index[: index.shape[0]] = index
        all_rows = [torch.empty_like(pad_rows) for _ in range(info.world_size)]
        all_index = [torch.empty_like(pad_index) for _ in range(info.world_size)]
        dist.all_gather(all_rows, pad_rows)
        dist.all_gather(all_index, pad_index)
        rows, index = torch.cat(all_rows), torch.cat(all_index)
        keep = index >= 0
        rows, index = rows[keep], index[keep]
    out = rows.new_zeros(total, rows.shape[1])
    seen = torch.zeros(total, dtype=torch.bool, device=rows.device)
    out[index] = rows
    seen[index] = True
    if not bool(seen.all()):
        missing = (~seen).nonzero().flatten().tolist()
        raise RuntimeError(f"{len(missing)} clips were not encoded (items {missing[:10]}); a video failed to "
                           "decode during evaluation")
    return out


@torch.no_grad()
def encode_videos(model: CLIP4Clip, dataset, info: DistInfo, *, batch_size: int, num_workers: int = 0,
                  progress: bool = True, desc: str = "videos") -> torch.Tensor:
    """L2-normalised embedding of every item of `dataset` (a `RetrievalDataset` of distinct clips).

    Each process encodes its shard once; the result `(len(dataset), D)` (float32, on the model's device)
    is identical on every process.
    """
    from tqdm.auto import tqdm

    loader = make_loader(dataset, batch_size, info, train=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    index, rows = [], []
    for batch in tqdm(loader, desc=desc, disable=not (progress and info.is_main), leave=False, dynamic_ncols=True):
        video = (batch["tokens"] if "tokens" in batch else batch["video"]).to(info.device, non_blocking=True)
        mask = batch["video_mask"].to(info.device, non_blocking=True)
        rows.append(model.encode_video(video, mask).float())
        index.append(torch.as_tensor(batch["index"], device=info.device))
    model.train(was_training)
    return _gather_rows(torch.cat(index), torch.cat(rows), len(dataset), info)


@torch.no_grad()
def encode_texts(model: CLIP4Clip, tokenize: Callable[[List[str]], torch.Tensor], texts: Sequence[str],
                 device: torch.device, *, batch_size: int) -> torch.Tensor:
    """L2-normalised embeddings `(Nt, D)` of `texts` (no video is decoded)."""
    was_training = model.training
    model.eval()
    out = [model.encode_text(tokenize(list(texts[i : i + batch_size])).to(device)).float()
           for i in range(0, len(texts), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=device)


def score_embeddings(model: CLIP4Clip, text: torch.Tensor, video: torch.Tensor, gt: torch.Tensor, *,
                     skipped: int = 0, dsl: bool = False, chunk_size: int = 4096) -> Dict[str, Any]:
    """Metrics of normalised `text (Nt, D)` against `video (Nv, D)`, `gt (Nt,)` the clip of every text."""
    sim = chunked_similarity(text, video, chunk_size)
    n_texts, n_videos = text.shape[0], video.shape[0]
    gt_or_none = None if (n_videos == n_texts and bool((gt == torch.arange(len(gt))).all())) else gt
    result: Dict[str, Any] = {"metrics": compute_metrics(sim, gt_or_none), "n_texts": n_texts,
                              "n_videos": n_videos, "skipped": skipped}
    if dsl:
        scale = float(model.logit_scale.detach().exp())
        result["dsl_metrics"] = compute_metrics(dual_softmax(sim, scale), gt_or_none)
        result["dsl_logit_scale"] = scale
    result.update(text=text.cpu(), video=video.cpu(), gt=gt)
    return result
