"""ActivityNet Captions paragraph-to-video retrieval ("val1" protocol); see ``docs/DATA.md``.

Files under ``data_path``: ``train.json`` and ``val_1.json`` (objects keyed by ``v_``-prefixed
id: ``duration``, ``timestamps``, ``sentences``) and ``train_ids.json`` / ``val_ids.json``
(lists of ``v_`` ids). Splits: ``"train"``, and ``"val"`` / ``"test"`` which both read
val_1 (the reported test set) unless ``val_json``/``val_ids`` or ``test_json``/``test_ids``
name other files (paths; relative ones are looked up in ``data_path``).

One sample per video: text = all sentences joined, whitespace collapsed (many sentences
start with a space); clip = 0 to ``ceil(duration)`` seconds (the decoder stops at the end).

Videos are found anywhere under ``features_path`` by file stem, named with the ``v_`` prefix
or without it (CLIP4Clip keys files by the id without ``v_`` and silently drops ``v_``-named
files; both are accepted here, the prefixed name first). Every mismatch is reported.
Tests: ``tests/examples/test_data_activitynet.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

from .base import (
    AnnotationError,
    Sample,
    SplitReport,
    annotation_field,
    escapes_folder,
    frame_defaults,
    list_video_files,
    read_annotation_json,
)

__all__ = ["DEFAULTS", "OPTIONS", "load_split", "scan"]

DEFAULTS = frame_defaults(max_words=64, max_frames=64)
_FILES = {
    "train": ("train.json", "train_ids.json"),
    "val": ("val_1.json", "val_ids.json"),
    "test": ("val_1.json", "val_ids.json"),
}
OPTIONS = tuple(f"{s}_{kind}" for s in _FILES for kind in ("json", "ids"))  # what scan/load_split read
_OPTIONS = set(OPTIONS)


def _strip_v(video_id: str) -> str:
    return video_id[2:] if video_id.startswith("v_") else video_id


def scan(data_path: str | Path, features_path: str | Path, split: str, **options) -> SplitReport:
    """Read an ActivityNet split and match its videos on disk (``load_split`` returns ``.samples``).

    Options: ``{train,val,test}_json`` and ``{train,val,test}_ids`` (paths); keys of
    ``DEFAULTS`` are accepted.
    """
    unknown = set(options) - set(DEFAULTS) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown ActivityNet options {sorted(unknown)}; known: {sorted(set(DEFAULTS) | _OPTIONS)}")
    if split not in _FILES:
        raise ValueError(f"ActivityNet split must be one of {tuple(_FILES)}, got {split!r}")
    data_path, features_path = Path(data_path), Path(features_path)
    json_name = options.get(f"{split}_json") or _FILES[split][0]
    ids_name = options.get(f"{split}_ids") or _FILES[split][1]
    json_path = Path(json_name) if Path(json_name).is_absolute() else data_path / json_name
    ids_path = Path(ids_name) if Path(ids_name).is_absolute() else data_path / ids_name
    for p in (json_path, ids_path):
        if not p.is_file():
            raise FileNotFoundError(f"ActivityNet file {p} does not exist")
    ids = read_annotation_json(ids_path, "ActivityNet ids")
    if not isinstance(ids, list) or not all(isinstance(v, str) for v in ids):
        raise AnnotationError(f"ActivityNet ids {ids_path} should be a JSON list of video id strings")
    ids = list(dict.fromkeys(ids))
    annotations = read_annotation_json(json_path, "ActivityNet annotations")
    if not isinstance(annotations, dict):
        raise AnnotationError(f"ActivityNet annotations {json_path} should be a JSON object keyed by video id, got "
                              f"{type(annotations).__name__}")
    outside = {v for v in ids if escapes_folder(features_path, v) or escapes_folder(features_path, f"{_strip_v(v)}.mp4")}
    refused = [f"{v} (in {ids_path.name}: its file would be outside {features_path})" for v in ids if v in outside]
    ids = [v for v in ids if v not in outside]

    unmatched = [f"{v} (in {ids_path.name}, not in {json_path.name})" for v in ids if v not in annotations]
    ids = [v for v in ids if v in annotations]
    by_stem: dict[str, list[Path]] = {}
    for p in list_video_files(features_path):
        by_stem.setdefault(Path(p.name).stem, []).append(p)

    samples, missing, notes = [], [], []
    matched_by = {"v_ name": 0, "name without v_": 0}
    n_sentences = 0
    for vid in ids:
        ann = annotations[vid]
        sentences = annotation_field(ann, "sentences", json_path, vid, list)
        if not all(isinstance(x, str) for x in sentences):
            raise AnnotationError(f"{json_path}: {vid} field 'sentences' should be a list of strings")
        duration = annotation_field(ann, "duration", json_path, vid, (int, float))
        if not math.isfinite(duration) or duration < 0:
            raise AnnotationError(f"{json_path}: {vid} has duration {duration}; expected a finite number >= 0")
        n_sentences += len(sentences)
        text = " ".join(" ".join(sentences).split())
        path = None
        for kind, key in (("v_ name", vid), ("name without v_", _strip_v(vid))):
            hits = by_stem.get(key)
            if hits:
                path = hits[0]
                matched_by[kind] += 1
                if len(hits) > 1:
                    notes.append(f"{vid}: {len(hits)} files with stem {key}, using {hits[0]}")
                break
        if path is None:
            missing.append(f"{vid} (no file {vid}.* or {_strip_v(vid)}.*)")
            path = features_path / f"{_strip_v(vid)}.mp4"
        samples.append(Sample(vid, path, text, 0.0, float(math.ceil(float(duration)))))
    return SplitReport(
        dataset="activitynet",
        split=split,
        samples=samples,
        n_videos=len(ids),
        n_captions=n_sentences,
        found=len(ids) - len(missing),
        missing=missing,
        unmatched=unmatched,
        matched_by=matched_by,
        notes=notes + [f"{split} reads {json_path.name} and {ids_path.name}"],
        refused=refused,
    )


def load_split(data_path: str | Path, features_path: str | Path, split: str, **options) -> list[Sample]:
    """One paragraph sample per video of an ActivityNet split; every mismatch is logged."""
    report = scan(data_path, features_path, split, **options)
    report.log()
    return report.samples
