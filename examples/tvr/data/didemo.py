"""DiDeMo paragraph-to-video retrieval in CLIP4Clip's layout; see ``docs/DATA.md``.

Files under ``data_path``: ``{split}_list.txt`` (one video file name per line) and
``{split}_data.json`` (list of annotations with ``description``, ``times``, ``video``; other
keys are ignored). Splits ``"train"``, ``"val"``, ``"test"``.

One sample per listed video that has annotations: text = its descriptions joined with
spaces in file order (whitespace collapsed), clip = seconds 0 to 31 (``end=31.0``; the
decoder stops where the video ends, so this is 0 to min(31, duration) as in CLIP4Clip).

Video files are found anywhere under ``features_path``. A listed name is matched to a file

1. exactly (same file name);
2. else by stem (``x.avi`` listed, ``x.mp4`` on disk);
3. else with a trailing ``.mp4`` stripped from the file name (``x.mov`` listed,
   ``x.mov.mp4`` on disk, as the common download script saves them).

CLIP4Clip matches exactly and drops mismatches silently (its test set has 1,003 videos, not
1,004); here every mismatch is in the ``SplitReport`` and logged, and unmatched videos are kept
with their listed name under ``features_path`` so that ``RetrievalDataset`` fails on them
unless ``skip_broken=True``. Tests: ``tests/examples/test_data_didemo.py``.
"""

from __future__ import annotations

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

__all__ = ["DEFAULTS", "OPTIONS", "load_split", "match_files", "scan"]

DEFAULTS = {**frame_defaults(max_words=64, max_frames=64), "clip_end": 31.0}
OPTIONS = ("clip_end",)  # what scan/load_split read
SPLITS = ("train", "val", "test")


def match_files(names: list[str], files: list[Path]) -> tuple[dict[str, Path], dict[str, str], list[str]]:
    """Match listed video names to files: exact, then stem, then trailing ``.mp4`` stripped.

    Returns ``(paths, how, notes)``: the file of each matched name, how it matched
    (``"exact" | "stem" | "stripped"``), and notes on ambiguous matches (the first file in
    sorted order is used).
    """
    by_name: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    by_stripped: dict[str, list[Path]] = {}
    for f in files:
        by_name.setdefault(f.name, []).append(f)
        by_stem.setdefault(Path(f.name).stem, []).append(f)
        if f.name.lower().endswith(".mp4"):
            by_stripped.setdefault(f.name[: -len(".mp4")], []).append(f)
    paths: dict[str, Path] = {}
    how: dict[str, str] = {}
    notes: list[str] = []
    for name in names:
        for kind, table, key in (
            ("exact", by_name, name),
            ("stem", by_stem, Path(name).stem),
            ("stripped", by_stripped, name),
        ):
            hits = table.get(key)
            if hits:
                paths[name], how[name] = hits[0], kind
                if len(hits) > 1:
                    notes.append(f"{name}: {len(hits)} files match by {kind}, using {hits[0]}")
                break
    return paths, how, notes


def scan(data_path: str | Path, features_path: str | Path, split: str, **options) -> SplitReport:
    """Read a DiDeMo split and match its videos on disk (``load_split`` returns ``.samples``).

    Options: ``clip_end`` (seconds, default 31.0); keys of ``DEFAULTS`` are accepted.
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown DiDeMo options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    if split not in SPLITS:
        raise ValueError(f"DiDeMo split must be one of {SPLITS}, got {split!r}")
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    data_path, features_path = Path(data_path), Path(features_path)
    list_path, json_path = data_path / f"{split}_list.txt", data_path / f"{split}_data.json"
    for p in (list_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"DiDeMo file {p} does not exist")
    try:
        listed = [line.strip() for line in list_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise AnnotationError(f"DiDeMo list {list_path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    listed = list(dict.fromkeys(listed))
    refused = [f"{v} (in {list_path.name}: its file would be outside {features_path})" for v in listed
               if escapes_folder(features_path, v)]
    listed = [v for v in listed if not escapes_folder(features_path, v)]
    annotations = read_annotation_json(json_path, "DiDeMo annotations")
    if not isinstance(annotations, list):
        raise AnnotationError(f"DiDeMo annotations {json_path} should be a JSON list, got {type(annotations).__name__}")
    texts: dict[str, list[str]] = {}
    n_descriptions = 0
    listed_set = set(listed)
    not_listed: dict[str, int] = {}
    for n, itm in enumerate(annotations):
        video = annotation_field(itm, "video", json_path, f"entry {n}", str)
        if video not in listed_set:
            not_listed[video] = not_listed.get(video, 0) + 1
            continue
        texts.setdefault(video, []).append(annotation_field(itm, "description", json_path, f"entry {n}", str))
        n_descriptions += 1
    unmatched = [f"{v} (in {list_path.name}, no annotation in {json_path.name})" for v in listed if v not in texts]
    unmatched += [f"{v} (annotated in {json_path.name}, not in {list_path.name})" for v in not_listed]
    videos = [v for v in listed if v in texts]
    paths, how, notes = match_files(videos, list_video_files(features_path))
    samples = [
        Sample(v, paths.get(v, features_path / v), " ".join(" ".join(texts[v]).split()), 0.0, float(opts["clip_end"]))
        for v in videos
    ]
    matched_by: dict[str, int] = {}
    for kind in how.values():
        matched_by[kind] = matched_by.get(kind, 0) + 1
    return SplitReport(
        dataset="didemo",
        split=split,
        samples=samples,
        n_videos=len(videos),
        n_captions=n_descriptions,
        found=len(paths),
        missing=[f"{v} (no file named {v}, {Path(v).stem}.* or {v}.mp4)" for v in videos if v not in paths],
        unmatched=unmatched,
        matched_by=matched_by,
        notes=notes,
        refused=refused,
    )


def load_split(data_path: str | Path, features_path: str | Path, split: str, **options) -> list[Sample]:
    """One paragraph sample per video of a DiDeMo split; every mismatch is logged."""
    report = scan(data_path, features_path, split, **options)
    report.log()
    return report.samples
