"""Encode a data set once with the frozen CLIP: token maps of every clip, features of every text.

For each split, the distinct clips (``group_by_video`` order) are cut into shards of ``shard_clips``
clips and the text rows into shards of ``shard_texts`` rows. Shard k is written by process
``k % world_size`` (rank-strided, so the files and their bytes do not depend on the number of
processes), each batch of a shard starting at the same clip whatever happened before: a killed run
restarts, skips the shards already on disk and writes the others byte-identical to an uninterrupted
run. The main process writes ``<split>/index.json`` first and, after a barrier, the manifest entry of
the split with its file list. Before anything is written the expected size is printed and compared
with the free disk space.

Token maps are what the MUSE head reads: `(T, 1+H*W, D)` per clip, after ``ln_post`` and CLIP's visual
projection (`open_clip_tokens`), zero on padded frames; row 0 of each frame is CLIP's image embedding
(meanP / seqTransf read it). Text features are CLIP's projected end-of-text features, not normalised.
Shape letters: T frames, H x W patch grid, D embedding width, L = max_words.
Tests: tests/examples/test_cache.py.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.base import Sample, group_by_video
from ..distributed import DistInfo, barrier, broadcast_object
from ..video import FrameConfig, load_frames
from .format import (
    FORMAT,
    INDEX_NAME,
    MANIFEST_NAME,
    CacheMismatchError,
    format_diff,
    read_json,
    remove_stale_temporaries,
    settings_diff,
    sha256_file,
    shard_name,
    shard_rows,
    write_json_atomic,
    write_safetensors,
)

__all__ = ["SplitPlan", "plan_split", "samples_from_index", "frame_settings", "encode_clip_tokens", "encode_text_features", "expected_bytes",
           "write_split", "build_cache", "decoder_version", "DEFAULT_SHARD_CLIPS", "DEFAULT_SHARD_TEXTS"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_CLIPS = 256  # MSR-VTT ViT-B/32 12 frames: 157 MB per shard
DEFAULT_SHARD_TEXTS = 8192

#: on_shard(split, kind, shard_index) is called after every shard this process wrote (tests stop runs here)
ShardHook = Callable[[str, str, int], None]


# ------------------------------------------------------------------------------------ plan
@dataclass
class SplitPlan:
    """What a split's cache holds, in a deterministic order.

    ``clips``: distinct clips (group_by_video order); ``texts``: text rows (the sample's captions, or its
    text); per sample: ``sample_clip`` (clip row), ``text_start`` / ``text_count`` (its text rows) and
    ``draw`` (True when the sample holds several captions to draw from at every access).
    """

    clips: List[Sample]
    texts: List[str]
    sample_clip: List[int]
    text_start: List[int]
    text_count: List[int]
    draw: List[bool]
    samples: List[Sample]

    def index(self) -> Dict[str, Any]:
        """JSON form of the plan (``<split>/index.json``)."""
        return {
            "format": FORMAT,
            "clips": [[c.video_id, str(c.video_path), c.start, c.end] for c in self.clips],
            "texts": self.texts,
            "samples": {"clip": self.sample_clip, "text_start": self.text_start, "text_count": self.text_count,
                        "draw": [int(d) for d in self.draw], "video_id": [s.video_id for s in self.samples]},
        }


def plan_split(samples: Sequence[Sample]) -> SplitPlan:
    samples = list(samples)
    clips, gt = group_by_video(samples)
    texts: List[str] = []
    start, count, draw = [], [], []
    for s in samples:
        rows = list(s.captions) if s.captions else [s.text]
        start.append(len(texts))
        count.append(len(rows))
        draw.append(bool(s.captions))
        texts.extend(rows)
    return SplitPlan(clips, texts, gt.tolist(), start, count, draw, samples)


def samples_from_index(index: Mapping[str, Any]) -> List[Sample]:
    """The `Sample` list a split's index was written from (paths as they were when caching)."""
    clips = index["clips"]
    texts = index["texts"]
    sm = index["samples"]
    out = []
    for c, s, n, d in zip(sm["clip"], sm["text_start"], sm["text_count"], sm["draw"]):
        vid, path, t0, t1 = clips[c]
        rows = tuple(texts[s : s + n])
        out.append(Sample(vid, Path(path), rows[0], t0, t1, captions=rows if d else ()))
    return out


# ---------------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_clip_tokens(clip: nn.Module, video: torch.Tensor, video_mask: torch.Tensor,
                       frame_chunk_size: Optional[int] = None) -> torch.Tensor:
    """Token maps of the real frames, zeros on padded ones.

    Args:
        clip: an open_clip CLIP ViT.
        video: `(B, T, 3, R, R)` normalised frames.
        video_mask: `(B, T)`, 1 on real frames.
        frame_chunk_size: at most this many frames per CLIP call (None = all real frames at once).

    Returns:
        `(B, T, 1+H*W, D)` float32 (`open_clip_tokens`: after ln_post and the visual projection).
    """
    from muse_pyramid.backbones import open_clip_tokens

    if video.ndim != 5 or video_mask.shape != video.shape[:2]:
        raise ValueError(f"video must be (B, T, 3, R, R) with video_mask (B, T); got {tuple(video.shape)} and "
                         f"{tuple(video_mask.shape)}")
    valid = video_mask.bool()
    frames = video[valid]
    step = frame_chunk_size or max(frames.shape[0], 1)
    feats = torch.cat([open_clip_tokens(clip, frames[i : i + step]).float()
                       for i in range(0, frames.shape[0], step)])
    full = feats.new_zeros(*video.shape[:2], *feats.shape[1:])
    full[valid] = feats
    return full


@torch.no_grad()
def encode_text_features(clip: nn.Module, text_ids: torch.Tensor) -> torch.Tensor:
    """`text_ids (N, L)` -> `(N, D)` float32 CLIP end-of-text features (projected, not normalised)."""
    from muse_pyramid.backbones import open_clip_text_features

    return open_clip_text_features(clip, text_ids).float()


def frame_settings(frames: FrameConfig) -> Dict[str, int]:
    """The frame rule as manifest fields."""
    return {"max_frames": frames.max_frames, "feature_framerate": frames.feature_framerate,
            "slice_framepos": frames.slice_framepos, "image_resolution": frames.image_resolution}


def decoder_version() -> str:
    """PyAV and FFmpeg versions of the decoder that reads the videos."""
    try:
        import av
    except ImportError:
        return "av not installed"
    libs = getattr(av, "library_versions", {}) or {}
    ffmpeg = ".".join(str(x) for x in libs.get("libavcodec", ())) or "?"
    return f"av {av.__version__} (libavcodec {ffmpeg})"


class _ClipFrames(Dataset):
    """Frames of one split's distinct clips, decoded with CLIP4Clip's rule (an error names the file)."""

    def __init__(self, clips: Sequence[Sample], frames: FrameConfig) -> None:
        self.clips, self.frames = list(clips), frames

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        c = self.clips[i]
        video, mask = load_frames(c.video_path, self.frames, c.start, c.end)
        return {"video": video, "video_mask": mask, "index": i}


class _TextIds(Dataset):
    def __init__(self, texts: Sequence[str], tokenize: Callable[[List[str]], torch.Tensor]) -> None:
        self.texts, self.tokenize = list(texts), tokenize

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokenize([self.texts[i]])[0].long()


def _shards(n: int, size: int) -> List[range]:
    return [range(k, min(k + size, n)) for k in range(0, n, size)]


def _batches(shard_ranges: Sequence[range], batch_size: int) -> List[List[int]]:
    """Batches that start at every shard's first row: a shard's bytes never depend on the others."""
    return [list(r[i : i + batch_size]) for r in shard_ranges for i in range(0, len(r), batch_size)]


def expected_bytes(n_clips: int, n_texts: int, max_frames: int, tokens_per_frame: int, dim: int,
                   max_words: int) -> Dict[str, int]:
    """Bytes of a split's shard data: fp16 tokens + uint8 masks + int64 indices; fp16 features + int32 ids."""
    videos = n_clips * (max_frames * tokens_per_frame * dim * 2 + max_frames + 8)
    texts = n_texts * (dim * 2 + max_words * 4 + 8)
    return {"videos": videos, "texts": texts, "total": videos + texts}


def _size(n: float) -> str:
    """Bytes in decimal units: "5.53 GB", "12.0 MB", "812 B"."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------ writer
def write_split(
    clip: nn.Module,
    samples: Sequence[Sample],
    split_dir: Path,
    *,
    split: str,
    frames: FrameConfig,
    tokenize: Callable[[List[str]], torch.Tensor],
    info: DistInfo,
    max_words: int,
    shard_clips: int = DEFAULT_SHARD_CLIPS,
    shard_texts: int = DEFAULT_SHARD_TEXTS,
    batch_size: int = 16,
    num_workers: int = 0,
    frame_chunk_size: Optional[int] = None,
    autocast: Optional[Callable[[], Any]] = None,
    progress: bool = True,
    on_shard: Optional[ShardHook] = None,
    checksums: Optional[Mapping[str, str]] = None,
) -> Dict[str, Any]:
    """Write this process's missing shards of one split; returns the split's manifest entry (main process).

    Every process must call it with the same samples. See the module docstring for the layout.
    `checksums` (shard name -> sha256, from an earlier manifest): shards whose bytes no longer match are
    damaged and written again (checked by the main process, which tells the others).
    """
    if shard_clips < 1 or shard_texts < 1 or batch_size < 1:
        raise ValueError(f"shard_clips, shard_texts and batch_size must be >= 1, got {shard_clips}, "
                         f"{shard_texts}, {batch_size}")
    split_dir = Path(split_dir)
    plan = plan_split(samples)
    if not plan.clips:
        raise ValueError(f"split {split!r} has no samples to cache")
    device = next(clip.parameters()).device
    visual = clip.visual
    grid = tuple(int(g) for g in visual.grid_size)
    tokens_per_frame = 1 + grid[0] * grid[1]
    dim = int(visual.proj.shape[1] if visual.proj is not None else visual.output_dim)
    T = frames.max_frames

    # 1. index: written by the main process; a different existing index means the data changed
    index = plan.index()
    problem = None
    if info.is_main:
        split_dir.mkdir(parents=True, exist_ok=True)
        path = split_dir / INDEX_NAME
        if path.is_file():
            old = read_json(path)
            if old != index:
                problem = (f"{path} lists other clips/texts than this run's {split} split ({len(old['clips'])} vs "
                           f"{len(plan.clips)} clips, {len(old['texts'])} vs {len(plan.texts)} texts): the "
                           "annotations or video files changed since the cache was started; use a new cache_dir")
        else:
            write_json_atomic(path, index)
    problem = broadcast_object(problem)
    if problem:
        raise CacheMismatchError(problem)
    barrier()

    video_shards, text_shards = _shards(len(plan.clips), shard_clips), _shards(len(plan.texts), shard_texts)
    jobs = {"videos": (video_shards, "tokens"), "texts": (text_shards, "text_feat")}
    damaged = _damaged_shards(split_dir, checksums or {}) if info.is_main else []
    damaged = broadcast_object(damaged)
    pending = {kind: [k for k, r in enumerate(ranges)
                      if shard_name(kind, k) in damaged or shard_rows(split_dir / shard_name(kind, k), key) != len(r)]
               for kind, (ranges, key) in jobs.items()}

    # 2. size and free space (every process computes the same numbers)
    need = expected_bytes(sum(len(video_shards[k]) for k in pending["videos"]),
                          sum(len(text_shards[k]) for k in pending["texts"]), T, tokens_per_frame, dim, max_words)
    full = expected_bytes(len(plan.clips), len(plan.texts), T, tokens_per_frame, dim, max_words)
    free = shutil.disk_usage(split_dir).free
    if info.is_main:
        print(f"cache {split}: {len(plan.clips)} clips x {T} frames x {tokens_per_frame} tokens x {dim} (fp16) = "
              f"{_size(full['videos'])}, {len(plan.texts)} texts = {_size(full['texts'])}; to write now: "
              f"{_size(need['total'])} ({len(pending['videos'])}/{len(video_shards)} video shards, "
              f"{len(pending['texts'])}/{len(text_shards)} text shards); free: {_size(free)} on {split_dir}",
              flush=True)
    if need["total"] > free:
        raise OSError(f"not enough disk space for the {split} cache in {split_dir}: {_size(need['total'])} to write, "
                      f"{_size(free)} free; free some space or pass a cache_dir on a larger disk")

    ctx = autocast or contextlib.nullcontext

    def encode_videos(batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        with ctx():
            out = encode_clip_tokens(clip, batch["video"].to(device, non_blocking=True),
                                     batch["video_mask"].to(device, non_blocking=True), frame_chunk_size)
        out = out.to("cpu", torch.float16)
        if not bool(torch.isfinite(out).all()):
            names = ", ".join(str(plan.clips[i].video_path) for i in batch["index"].tolist())
            raise FloatingPointError(f"token maps of {split} clips ({names}) are not finite in float16")
        return {"tokens": out, "video_mask": batch["video_mask"].to(torch.uint8)}

    def encode_texts(ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        if ids.shape[1] != max_words:
            raise ValueError(f"tokenize returned {ids.shape[1]} ids per text, expected max_words={max_words}")
        with ctx():
            out = encode_text_features(clip, ids.to(device)).to("cpu", torch.float16)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"text features of {split} overflow float16")
        return {"text_feat": out, "text_ids": ids.to(torch.int32)}

    common = {"split": split, "split_dir": split_dir, "info": info, "num_workers": num_workers,
              "progress": progress, "on_shard": on_shard}
    was_training = clip.training
    clip.eval()
    try:
        _write_shards("videos", "clip_index", _ClipFrames(plan.clips, frames), video_shards, pending["videos"],
                      encode_videos, batch_size=batch_size, unit="clip", pin=device.type == "cuda", **common)
        _write_shards("texts", "text_index", _TextIds(plan.texts, tokenize), text_shards, pending["texts"],
                      encode_texts, batch_size=max(batch_size, 256), unit="text", pin=False, **common)
    finally:
        clip.train(was_training)
    barrier()

    entry: Dict[str, Any] = {}
    if info.is_main:
        for tmp in remove_stale_temporaries(split_dir):
            logger.info("removed %s, left by a killed cache writer", tmp)
        files = {}
        for kind, (ranges, key) in jobs.items():
            names = [shard_name(kind, k) for k in range(len(ranges))]
            bad = [n for n, r in zip(names, ranges) if shard_rows(split_dir / n, key) != len(r)]
            if bad:
                raise RuntimeError(f"cache {split}: shards {bad[:5]} are missing or damaged after writing")
            files[kind] = [{"name": n, "rows": len(r), "bytes": (split_dir / n).stat().st_size,
                            "sha256": sha256_file(split_dir / n)} for n, r in zip(names, ranges)]
        entry = {
            "n_clips": len(plan.clips), "n_samples": len(plan.samples), "n_texts": len(plan.texts),
            "shard_clips": shard_clips, "shard_texts": shard_texts, "tokens_shape": [T, tokens_per_frame, dim],
            "grid": list(grid), "dim": dim, "index": INDEX_NAME, "video_shards": files["videos"],
            "text_shards": files["texts"], "bytes": sum(f["bytes"] for v in files.values() for f in v),
            "complete": True,
        }
    return entry


def _damaged_shards(split_dir: Path, checksums: Mapping[str, str]) -> List[str]:
    """Names of the shards (of `checksums`) present in `split_dir` whose sha256 differs from the recorded one."""
    bad = []
    for name, digest in sorted(checksums.items()):
        path = split_dir / name
        if path.is_file() and sha256_file(path) != digest:
            logger.warning("cache shard %s does not match its sha256 in the manifest: writing it again", path)
            bad.append(name)
    return bad


def shard_checksums(entry: Mapping[str, Any]) -> Dict[str, str]:
    """`{shard name: sha256}` recorded in a split's manifest entry (empty for caches written without them)."""
    out = {}
    for kind in ("video_shards", "text_shards"):
        for f in entry.get(kind, []) if isinstance(entry, Mapping) else []:
            if isinstance(f, Mapping) and isinstance(f.get("sha256"), str):
                out[str(f["name"])] = f["sha256"]
    return out


def _meta(split: str, kind: str, k: int, r: range) -> Dict[str, str]:
    return {"format": FORMAT, "split": split, "kind": kind, "shard": str(k), "first": str(r.start),
            "rows": str(len(r))}


def _write_shards(kind: str, index_key: str, dataset: Dataset, ranges: Sequence[range], pending: Sequence[int],
                  encode: Callable[[Any], Dict[str, torch.Tensor]], *, split: str, split_dir: Path, info: DistInfo,
                  batch_size: int, num_workers: int, unit: str, pin: bool, progress: bool,
                  on_shard: Optional[ShardHook]) -> None:
    """Encode and write the pending shards of `kind` that belong to this process (k % world == rank)."""
    from tqdm.auto import tqdm

    mine = [k for k in pending if k % info.world_size == info.rank]
    loader = DataLoader(dataset, batch_sampler=_batches([ranges[k] for k in mine], batch_size),
                        num_workers=num_workers, pin_memory=pin)
    bar = tqdm(total=sum(len(ranges[k]) for k in mine), desc=f"cache {split} {kind}", unit=unit,
               disable=not progress, dynamic_ncols=True, position=info.rank if info.distributed else None)
    batches = iter(loader)
    for k in mine:
        r, parts, filled = ranges[k], [], 0
        while filled < len(r):
            parts.append(encode(next(batches)))
            n = next(iter(parts[-1].values())).shape[0]
            filled += n
            bar.update(n)
        tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        tensors[index_key] = torch.arange(r.start, r.stop)
        write_safetensors(split_dir / shard_name(kind, k), tensors, _meta(split, kind, k, r))
        if on_shard is not None:
            on_shard(split, kind, k)
    bar.close()


# ------------------------------------------------------------------------------------- cache
def build_cache(
    clip: nn.Module,
    splits: Mapping[str, Sequence[Sample]],
    cache_dir: str | Path,
    settings: Mapping[str, Any],
    *,
    frames: FrameConfig,
    tokenize: Callable[[List[str]], torch.Tensor],
    info: Optional[DistInfo] = None,
    aliases: Optional[Mapping[str, str]] = None,
    skipped: Optional[Mapping[str, List[str]]] = None,
    **write_kwargs: Any,
) -> Dict[str, Any]:
    """Cache every split of `splits` under `cache_dir`; returns the manifest.

    Args:
        clip: the frozen open_clip CLIP (on the device to encode with).
        splits: split name -> samples (e.g. `{"train": ..., "test": ...}`).
        settings: what a training run must match (`cache_settings`: dataset, backbone, weights, frame
            rule, max_words, data options, ...). Resuming with other settings raises `CacheMismatchError`.
        aliases: split -> split it equals (e.g. MSR-VTT's val = test), recorded instead of a copy.
        skipped: split -> videos left out as unreadable (recorded in the manifest).
        write_kwargs: `write_split` options (shard sizes, batch size, workers, progress, on_shard, ...).
    """
    info = info or DistInfo()
    cache_dir = Path(cache_dir)
    settings = dict(settings)
    for key, value in frame_settings(frames).items():
        if settings.setdefault(key, value) != value:
            raise ValueError(f"settings[{key!r}]={settings[key]!r} disagrees with frames.{key}={value!r}")
    settings.setdefault("decoder", decoder_version())
    problem = None
    manifest: Dict[str, Any] = {}
    if info.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / MANIFEST_NAME
        if path.is_file():
            try:
                manifest = read_json(path)
            except ValueError as err:  # reported on every process below
                manifest, problem = None, str(err)
            if problem:
                pass
            elif not isinstance(manifest, dict) or not isinstance(manifest.get("splits", {}), dict):
                problem = f"{path} is not a cache manifest (a JSON object with 'splits'); use a new cache_dir"
            elif manifest.get("format") != FORMAT:
                problem = f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}"
            elif diff := settings_diff(manifest.get("settings", {}), settings):
                problem = (f"the cache in {cache_dir} was started with other settings: {format_diff(diff)}; "
                           "resume with the same flags, or use a new cache_dir")
        else:
            manifest = {"format": FORMAT, "settings": settings, "splits": {}}
            write_json_atomic(path, manifest)
    problem = broadcast_object(problem)
    if problem:
        raise CacheMismatchError(problem)
    barrier()

    for split, samples in splits.items():
        known = shard_checksums(manifest.get("splits", {}).get(split, {}))  # the main process verifies them
        entry = write_split(clip, samples, cache_dir / split, split=split, frames=frames, tokenize=tokenize,
                            info=info, max_words=int(settings["max_words"]), checksums=known, **write_kwargs)
        if info.is_main:
            entry["skipped_videos"] = list((skipped or {}).get(split, []))
            manifest["splits"][split] = entry
            write_json_atomic(cache_dir / MANIFEST_NAME, manifest)
    if info.is_main:
        for split, target in (aliases or {}).items():
            manifest["splits"][split] = {"alias": target, "complete": True}
        manifest["bytes"] = sum(e.get("bytes", 0) for e in manifest["splits"].values())
        write_json_atomic(cache_dir / MANIFEST_NAME, manifest)
        logger.info("cache %s complete: %s", cache_dir, _size(manifest["bytes"]))
    barrier()
    return manifest
