"""Read a feature cache: the manifest check and torch Datasets over memory-mapped shards.

`CachedRetrievalDataset` is the cached twin of `RetrievalDataset`: same items in the same order, same
random caption draw (one `torch.randint` per access when a sample holds several captions), but the
frames are replaced by the clip's stored token maps and the text by its stored CLIP feature. With
`verify=True` (`--verify_cache`) every shard of the split is checked against the sha256 recorded in the
manifest before anything is read; any failure to read a shard names the shard.
Shape letters: T frames, P = 1+H*W tokens per frame, D embedding width, L = max_words.
Tests: tests/examples/test_cache.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.base import Sample
from .format import (
    FORMAT,
    MANIFEST_NAME,
    CacheMismatchError,
    CacheShardError,
    format_diff,
    open_memmap,
    read_json,
    settings_diff,
    sha256_file,
)
from .writer import samples_from_index

__all__ = ["RUN_KEYS", "load_manifest", "check_settings", "CachedRetrievalDataset", "CachedClipDataset"]

logger = logging.getLogger(__name__)

#: Settings a training / evaluation run must share with the cache it reads.
RUN_KEYS = ("dataset", "data_options", "backbone", "architecture", "weights", "max_frames", "feature_framerate", "slice_framepos",
            "image_resolution", "max_words", "tokenizer")


def load_manifest(cache_dir: str | Path) -> Dict[str, Any]:
    """`manifest.json` of a cache folder; FileNotFoundError / ValueError with the remedy otherwise."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no cache at {cache_dir}: {path} does not exist; build it first with the "
                                "cache command (see docs/reproduction.md)")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a cache manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("splits"), dict) or not isinstance(manifest.get("settings", {}), dict):
        raise ValueError(f"{path} is damaged: 'splits' / 'settings' are not JSON objects; rerun the cache command")
    return manifest


def check_settings(manifest: Mapping[str, Any], run: Mapping[str, Any], *, cache_dir: str | Path = "",
                   keys: Sequence[str] = RUN_KEYS) -> None:
    """Raise `CacheMismatchError` naming every field of `keys` where the cache and the run differ."""
    diff = settings_diff(manifest.get("settings", {}), run, keys)
    if diff:
        raise CacheMismatchError(
            f"the cache {cache_dir} does not match this run's settings ({', '.join(d[0] for d in diff)} differ): "
            f"{format_diff(diff)}. Rebuild the cache with the run's flags, or run with the cache's settings"
        )


_ENTRY_FIELDS = {"video_shards": list, "text_shards": list, "shard_clips": int, "shard_texts": int, "n_clips": int,
                 "index": str}


def _split_entry(manifest: Mapping[str, Any], split: str, cache_dir: Path,
                 verify: bool = False) -> Tuple[str, Dict[str, Any]]:
    splits = manifest.get("splits", {})
    where = Path(cache_dir) / MANIFEST_NAME
    seen = []
    while isinstance(splits.get(split), dict) and "alias" in splits[split] and split not in seen:
        seen.append(split)
        split = splits[split]["alias"]
    entry = splits.get(split)
    if not isinstance(entry, dict) or not entry.get("complete"):
        have = sorted(k for k, v in splits.items() if isinstance(v, dict) and v.get("complete"))
        raise FileNotFoundError(f"the cache {cache_dir} holds no complete {split!r} split (complete: {have}); "
                                "run the cache command for it")
    for name, kind in _ENTRY_FIELDS.items():
        if not isinstance(entry.get(name), kind) or (kind is int and entry[name] < 1):
            raise ValueError(f"{where} is damaged: split {split!r} field {name!r} is {entry.get(name)!r:.60}; "
                             "rerun the cache command")
    for kind in ("video_shards", "text_shards"):
        for f in entry[kind]:
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("bytes"), int)
                    and "/" not in f["name"] and "\\" not in f["name"] and not f["name"].startswith(".")):
                raise ValueError(f"{where} is damaged: split {split!r} lists the shard {f!r:.80}; rerun the cache "
                                 "command")
            p = cache_dir / split / f["name"]
            if not p.is_file():
                raise FileNotFoundError(f"cache shard {p} is missing; rerun the cache command to repair it")
            size = p.stat().st_size
            if size != f["bytes"]:
                raise CacheShardError(f"cache shard {p} is missing or damaged ({size} bytes, manifest says "
                                      f"{f['bytes']}); rerun the cache command to repair it")
            if verify:
                if not isinstance(f.get("sha256"), str):
                    raise CacheShardError(f"cannot verify cache shard {p}: the manifest records no sha256 (a cache "
                                          "written by an older version); rerun the cache command to record them")
                if sha256_file(p) != f["sha256"]:
                    raise CacheShardError(f"cache shard {p} is damaged (its sha256 differs from the manifest's); "
                                          "rerun the cache command to repair it")
    return split, dict(entry)


class _Shards:
    """Row access across the fixed-size shards of one kind; files are mapped lazily, per process."""

    def __init__(self, folder: Path, files: List[Mapping[str, Any]], rows_per_shard: int) -> None:
        self.paths = [folder / f["name"] for f in files]
        self.rows_per_shard = rows_per_shard
        self._maps: Dict[int, Dict[str, np.ndarray]] = {}

    def row(self, i: int, key: str) -> np.ndarray:
        k, r = divmod(i, self.rows_per_shard)
        if k >= len(self.paths):
            raise CacheShardError(f"row {i} is beyond the {len(self.paths)} shards listed in the manifest (next to "
                                  f"{self.paths[-1] if self.paths else 'none'}); the cache index is damaged")
        if k not in self._maps:
            self._maps[k] = open_memmap(self.paths[k])
        arrays = self._maps[k]
        if key not in arrays or arrays[key].ndim == 0 or r >= arrays[key].shape[0]:
            have = {n: tuple(a.shape) for n, a in arrays.items()}
            raise CacheShardError(f"cache shard {self.paths[k]} is damaged (no row {r} of {key!r}; it holds {have}); "
                                  "rerun the cache command to repair it")
        return np.array(arrays[key][r])  # a copy: the map stays read-only

    def __getstate__(self) -> Dict[str, Any]:  # DataLoader workers map the files themselves
        return {"paths": self.paths, "rows_per_shard": self.rows_per_shard, "_maps": {}}


def _check_index(index: Any, entry: Mapping[str, Any], path: Path) -> None:
    """ValueError naming `path` when a split's index is not the structure the writer wrote."""
    try:
        sm = index["samples"]
        n = len(sm["clip"])
        ok = (all(len(sm[k]) == n for k in ("text_start", "text_count", "draw"))
              and len(index["clips"]) == entry["n_clips"]
              and all(isinstance(c, int) and 0 <= c < entry["n_clips"] for c in sm["clip"])
              and all(isinstance(s, int) and isinstance(m, int) and m >= 1 and 0 <= s and s + m <= len(index["texts"])
                      for s, m in zip(sm["text_start"], sm["text_count"])))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a cache index (missing {err}); rerun the cache command") from err
    if not ok:
        raise ValueError(f"{path} is damaged: its sample rows do not match the manifest's clips / texts; rerun the "
                         "cache command")


class _CacheSplit:
    """The files of one cached split."""

    def __init__(self, cache_dir: str | Path, split: str, settings: Optional[Mapping[str, Any]],
                 verify: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = load_manifest(self.cache_dir)
        if settings is not None:
            check_settings(self.manifest, settings, cache_dir=self.cache_dir)
        self.split, self.entry = _split_entry(self.manifest, split, self.cache_dir, verify)
        folder = self.cache_dir / self.split
        self.index = read_json(folder / self.entry["index"])
        _check_index(self.index, self.entry, folder / self.entry["index"])
        self.videos = _Shards(folder, self.entry["video_shards"], self.entry["shard_clips"])
        self.texts = _Shards(folder, self.entry["text_shards"], self.entry["shard_texts"])

    def tokens(self, clip: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(self.videos.row(clip, "tokens")).to(dtype)
        mask = torch.from_numpy(self.videos.row(clip, "video_mask")).long()
        return tokens, mask


class CachedRetrievalDataset(Dataset):
    """(text feature, token maps) pairs of a cached split, in the order of the split's samples.

    Args:
        cache_dir: the cache folder.
        split: "train", "val" or "test" (an alias such as MSR-VTT's val = test is followed).
        settings: the run's settings (`RUN_KEYS`); when given, a cache built otherwise raises
            `CacheMismatchError` naming the differing fields.
        token_dtype: dtype of the returned token maps (float32 by default; float16 halves host-to-device
            traffic, the model then casts).
        verify: check every shard of the split against the manifest's sha256 first (`CacheShardError`
            naming the first damaged one).

    Items: ``{"tokens": (T, P, D) token_dtype, "video_mask": (T,) int64, "text_feat": (D,) float32,
    "text_ids": (L,) int64, "index": int}``; ``tokens`` are zero on padded frames.
    """

    def __init__(self, cache_dir: str | Path, split: str, *, settings: Optional[Mapping[str, Any]] = None,
                 token_dtype: torch.dtype = torch.float32, verify: bool = False) -> None:
        self._cache = _CacheSplit(cache_dir, split, settings, verify)
        self.token_dtype = token_dtype
        sm = self._cache.index["samples"]
        self.sample_clip: List[int] = list(sm["clip"])
        self.text_start: List[int] = list(sm["text_start"])
        self.text_count: List[int] = list(sm["text_count"])
        self.draw: List[bool] = [bool(d) for d in sm["draw"]]
        self.samples: List[Sample] = samples_from_index(self._cache.index)
        self.skipped: list = list(self._cache.entry.get("skipped_videos", []))

    @property
    def manifest(self) -> Dict[str, Any]:
        return self._cache.manifest

    @property
    def n_clips(self) -> int:
        return int(self._cache.entry["n_clips"])

    def __len__(self) -> int:
        return len(self.sample_clip)

    def text_row(self, i: int) -> int:
        """Text row of item `i` for this access (a random caption when the sample holds several)."""
        if self.draw[i]:
            return self.text_start[i] + int(torch.randint(self.text_count[i], ()).item())
        return self.text_start[i]

    def text_features(self) -> torch.Tensor:
        """`(N, D)` float32: every sample's first text feature (the evaluation texts), in sample order."""
        return torch.stack([torch.from_numpy(self._cache.texts.row(s, "text_feat")).float()
                            for s in self.text_start]) if len(self) else torch.empty(0)

    def clips(self) -> CachedClipDataset:
        """The split's distinct clips (`group_by_video` order) as a Dataset, for evaluation."""
        return CachedClipDataset(self._cache, self.token_dtype)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = i % len(self)
        tokens, mask = self._cache.tokens(self.sample_clip[i], self.token_dtype)
        row = self.text_row(i)
        feat = torch.from_numpy(self._cache.texts.row(row, "text_feat")).float()
        ids = torch.from_numpy(self._cache.texts.row(row, "text_ids")).long()
        return {"tokens": tokens, "video_mask": mask, "text_feat": feat, "text_ids": ids, "index": i}


class CachedClipDataset(Dataset):
    """Distinct clips of a cached split. Items: ``{"tokens": (T, P, D), "video_mask": (T,) int64, "index"}``."""

    def __init__(self, cache: _CacheSplit, token_dtype: torch.dtype = torch.float32) -> None:
        self._cache, self.token_dtype = cache, token_dtype

    def __len__(self) -> int:
        return int(self._cache.entry["n_clips"])

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"clip {i} out of range for {len(self)} clips")
        tokens, mask = self._cache.tokens(i, self.token_dtype)
        return {"tokens": tokens, "video_mask": mask, "index": i}
