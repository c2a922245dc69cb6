"""Samples, frame settings and the torch Dataset shared by the five benchmarks.

A data set module (``msrvtt``, ``didemo``, ``activitynet``, ``msvd``, ``lsmdc``) turns the
benchmark files into a list of ``Sample`` (``load_split``) and a ``SplitReport`` of what
matched on disk (``scan``); ``RetrievalDataset`` turns samples into tensors. Readers find
their annotation files with ``data_file`` and their videos with ``index_by_stem`` /
``caption_split_report``. Tests: ``tests/examples/test_data_base.py`` and the per-format
``test_data_*.py``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..video import FrameConfig, VideoDecodeError, load_frames, probe_video

__all__ = [
    "VIDEO_EXTENSIONS",
    "AnnotationError",
    "annotation_field",
    "escapes_folder",
    "read_annotation_json",
    "RetrievalDataset",
    "Sample",
    "SplitReport",
    "caption_split_report",
    "check_scan_args",
    "data_file",
    "frame_defaults",
    "group_by_video",
    "index_by_stem",
    "list_video_files",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".flv", ".wmv")


class AnnotationError(ValueError):
    """An annotation file that cannot be read as its format says (the message names the file)."""


def read_annotation_json(path: str | Path, what: str) -> object:
    """Parse the JSON annotation file `path` (`what` names it in messages, e.g. "MSR-VTT annotations")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} do not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{what} {path} are not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{what} {path} are not valid JSON: {err.msg} at line {err.lineno} column "
                              f"{err.colno}") from err


def annotation_field(item: object, key: str, path: str | Path, where: str, kind: type | tuple = object):
    """`item[key]`, or AnnotationError naming the file, the entry (`where`) and the missing / mistyped field."""
    if not isinstance(item, dict):
        raise AnnotationError(f"{path}: {where} should be a JSON object, got {type(item).__name__}")
    if key not in item:
        raise AnnotationError(f"{path}: {where} has no {key!r} field (fields: {sorted(item)[:8]})")
    value = item[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise AnnotationError(f"{path}: {where} field {key!r} should be {names}, got {type(value).__name__} "
                              f"{value!r:.80}")
    return value


def escapes_folder(folder: str | Path, name: str) -> bool:
    """True when `folder / name` (a name read from an annotation file) is not inside `folder` once `..`,
    absolute paths and empty / NUL names are resolved. Links placed inside the folder are followed as usual."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        return True
    root = os.path.abspath(os.fspath(folder))
    target = os.path.abspath(os.path.join(root, name))
    return os.path.commonpath([root, target]) != root or target == root


def frame_defaults(max_words: int, max_frames: int) -> dict:
    """A data set's published text/frame settings; the rest is CLIP4Clip's default frame rule."""
    return {
        "max_words": max_words,
        "max_frames": max_frames,
        "feature_framerate": 1,
        "slice_framepos": 2,
        "image_resolution": 224,
    }


@dataclass(frozen=True)
class Sample:
    """One (text, video clip) pair.

    ``start`` / ``end`` are clip bounds in seconds (``None`` = whole video; the decoder casts
    them with ``int`` and clamps ``end`` to the video). ``captions``: when non-empty, all
    captions of the video; ``RetrievalDataset`` then draws one at random at every access
    (one random caption per video per epoch, CLIP4Clip's MSR-VTT setting without
    ``--expand_msrvtt_sentences``) and ``text`` is the first of them.
    """

    video_id: str
    video_path: Path
    text: str
    start: float | None = None
    end: float | None = None
    captions: tuple[str, ...] = ()


@dataclass
class SplitReport:
    """What a split's files describe and what was found on disk (every mismatch listed)."""

    dataset: str
    split: str
    samples: list[Sample]
    n_videos: int  # videos in the split (after dropping those without any caption)
    n_captions: int  # captions (sentences, or descriptions joined into paragraphs)
    found: int  # videos with a file on disk
    missing: list[str] = field(default_factory=list)  # videos of the split without a file
    unmatched: list[str] = field(default_factory=list)  # split entries the annotations do not cover, etc.
    matched_by: dict[str, int] = field(default_factory=dict)  # how files were matched, e.g. {"exact": 3}
    notes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # names that point outside the video folder (dropped)

    def log(self) -> None:
        level = logging.WARNING if self.missing or self.unmatched or self.refused else logging.INFO
        logger.log(
            level,
            "%s/%s: %d videos, %d captions, %d found on disk, %d missing, %d unmatched, %d refused",
            self.dataset, self.split, self.n_videos, self.n_captions, self.found,
            len(self.missing), len(self.unmatched), len(self.refused),
        )
        for name in self.refused:
            logger.warning("%s/%s: refused %s", self.dataset, self.split, name)
        for name in self.missing:
            logger.warning("%s/%s: no video file for %s", self.dataset, self.split, name)
        for name in self.unmatched:
            logger.warning("%s/%s: unmatched %s", self.dataset, self.split, name)

    def as_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "videos": self.n_videos,
            "captions": self.n_captions,
            "samples": len(self.samples),
            "found": self.found,
            "missing": len(self.missing),
            "unmatched": len(self.unmatched),
            "refused": len(self.refused),
            "refused_names": list(self.refused),
            "matched_by": dict(self.matched_by),
            "missing_names": list(self.missing),
            "unmatched_names": list(self.unmatched),
            "notes": list(self.notes),
        }


def list_video_files(root: str | Path, extensions: Iterable[str] = VIDEO_EXTENSIONS) -> list[Path]:
    """Every video file under ``root`` (recursive, symlinks followed), sorted for determinism."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist")
    exts = {e.lower() for e in extensions}
    out = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            if Path(name).suffix.lower() in exts:
                out.append(Path(dirpath) / name)
    return sorted(out)


def check_scan_args(dataset: str, split: str, splits: Iterable[str], options: dict, known: Iterable[str],
                    features_path: str | Path) -> None:
    """The checks every ``scan`` starts with: known option names, a known split, an existing video folder."""
    known, splits = set(known), tuple(splits)
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown {dataset} options {sorted(unknown)}; known: {sorted(known)}")
    if split not in splits:
        raise ValueError(f"{dataset} split must be one of {splits}, got {split!r}")
    if not Path(features_path).is_dir():
        raise FileNotFoundError(f"{dataset} video folder {features_path} does not exist")


def data_file(data_path: str | Path, name: str | Path) -> Path:
    """Where annotation file ``name`` of a data set is: an absolute ``name`` as given, a relative one
    under the annotation folder ``data_path``. Readers resolve every annotation file here."""
    name = Path(name)
    return name if name.is_absolute() else Path(data_path) / name


def index_by_stem(features_path: str | Path) -> dict[str, list[Path]]:
    """Every video file under ``features_path`` (recursive) keyed by its name without the last
    extension (``0001_Movie_00.00.51.926-00.00.54.129.avi`` -> ``0001_Movie_00.00.51.926-00.00.54.129``),
    files of one stem in sorted order."""
    out: dict[str, list[Path]] = {}
    for path in list_video_files(features_path):
        out.setdefault(path.stem, []).append(path)
    return out


def caption_split_report(
    dataset: str,
    split: str,
    pairs: Sequence[tuple[str, str]],
    features_path: str | Path,
    *,
    unmatched: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> SplitReport:
    """The report of a split with one sample per ``(video_id, caption)`` pair, videos matched by stem.

    Video ids keep their first-appearance order; the video of an id is the file anywhere under
    ``features_path`` whose name without its extension is the id (``index_by_stem``; the first in
    sorted order when several match, noted). A video without a file is listed in ``missing`` and
    its samples point at ``<features_path>/<id>`` so that ``RetrievalDataset`` reports it; an id that
    would point outside ``features_path`` (``..``, an absolute path) is dropped and listed in ``refused``.
    """
    features_path = Path(features_path)
    by_stem = index_by_stem(features_path)
    outside = {v for v, _ in pairs if escapes_folder(features_path, v)}
    pairs = [(v, text) for v, text in pairs if v not in outside]
    video_ids = list(dict.fromkeys(v for v, _ in pairs))
    paths: dict[str, Path] = {}
    notes = list(notes)
    for vid in video_ids:
        hits = by_stem.get(vid)
        if hits:
            paths[vid] = hits[0]
            if len(hits) > 1:
                notes.append(f"{vid}: {len(hits)} files with this stem, using {hits[0]}")
    matched_by: dict[str, int] = {}
    for path in paths.values():
        matched_by[path.suffix] = matched_by.get(path.suffix, 0) + 1
    return SplitReport(
        dataset=dataset,
        split=split,
        samples=[Sample(v, paths.get(v, features_path / v), text) for v, text in pairs],
        n_videos=len(video_ids),
        n_captions=len(pairs),
        found=len(paths),
        missing=[f"{v} (no file {v}.* under {features_path})" for v in video_ids if v not in paths],
        unmatched=list(unmatched),
        matched_by=matched_by,
        notes=notes,
        refused=[f"{v} (its file would be outside {features_path})" for v in sorted(outside)],
    )


def group_by_video(samples: Sequence[Sample]) -> tuple[list[Sample], Tensor]:
    """Unique clips in first-appearance order and, per sample, the index of its clip.

    Returns ``(videos, gt)`` with ``gt`` (len(samples),) int64: use ``videos`` to encode each
    clip once and ``gt`` as the ground truth of ``metrics.compute_metrics``.
    """
    index: dict[tuple, int] = {}
    videos: list[Sample] = []
    gt = []
    for s in samples:
        key = (str(s.video_path), s.start, s.end)
        if key not in index:
            index[key] = len(videos)
            videos.append(s)
        gt.append(index[key])
    return videos, torch.tensor(gt, dtype=torch.long)


class RetrievalDataset(Dataset):
    """(text ids, frames) pairs for training and evaluation.

    Args:
        samples: the pairs, e.g. from ``msrvtt.load_split``.
        tokenize: list of N strings -> (N, max_words) token ids (e.g. ``clip_tokenize`` with
            ``max_words`` bound).
        frames: how frames are read.
        skip_broken: if False (default), a missing video raises ``FileNotFoundError`` here,
            listing the missing files, and an undecodable one raises ``VideoDecodeError``
            (naming the file) when it is read. If True, every distinct video is probed here
            (exists, opens, first frame decodes) and the samples of broken ones are dropped;
            ``skipped`` lists ``(sample, reason)``. A video that passes the probe and still
            fails later is replaced by the next readable item (logged, counted in
            ``runtime_failures`` of that process), so no all-zero video reaches training.

    Items: ``{"text_ids": (max_words,) int64, "video": (T, 3, R, R) float32,
    "video_mask": (T,) int64, "index": int}`` where ``index`` is the item's position.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenize: Callable[[list[str]], Tensor],
        frames: FrameConfig,
        skip_broken: bool = False,
    ) -> None:
        self.tokenize = tokenize
        self.frames = frames
        self.skip_broken = skip_broken
        self.skipped: list[tuple[Sample, str]] = []
        self.runtime_failures = 0
        samples = list(samples)
        paths = list(dict.fromkeys(Path(s.video_path) for s in samples))
        if skip_broken:
            broken = {p: r for p in paths if (r := probe_video(p)) is not None}
            self.skipped = [(s, broken[Path(s.video_path)]) for s in samples if Path(s.video_path) in broken]
            samples = [s for s in samples if Path(s.video_path) not in broken]
            if broken:
                logger.warning(
                    "skipping %d of %d videos (%d samples) that cannot be read, e.g. %s: %s",
                    len(broken), len(paths), len(self.skipped), *next(iter(broken.items())),
                )
        else:
            missing = [p for p in paths if not p.is_file()]
            if missing:
                shown = ", ".join(str(p) for p in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise FileNotFoundError(
                    f"{len(missing)} of {len(paths)} videos are missing: {shown}{more}; "
                    "check features_path, run the validate command, or pass skip_broken=True"
                )
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def text_of(self, i: int) -> str:
        """The caption of item ``i`` for this access (a random one when the sample has several)."""
        s = self.samples[i]
        if s.captions:
            return s.captions[int(torch.randint(len(s.captions), ()).item())]
        return s.text

    def tokens(self, texts: list[str]) -> Tensor:
        ids = self.tokenize(texts)
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.shape[0] != len(texts):
            got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"tokenize must return ({len(texts)}, max_words) ids, got {got}")
        return ids.long()

    def _load(self, i: int) -> dict:
        s = self.samples[i]
        video, mask = load_frames(s.video_path, self.frames, s.start, s.end)
        return {"text_ids": self.tokens([self.text_of(i)])[0], "video": video, "video_mask": mask, "index": i}

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = i % len(self)
        if not self.skip_broken:
            return self._load(i)
        for attempt in range(min(len(self), 16)):
            j = (i + attempt) % len(self)
            try:
                return self._load(j)
            except VideoDecodeError as err:
                self.runtime_failures += 1
                logger.warning("skipping unreadable video (item %d): %s", j, err)
        raise VideoDecodeError(self.samples[i].video_path, "it and the next items all failed to decode")
