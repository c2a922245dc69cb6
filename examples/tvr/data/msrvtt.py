"""MSR-VTT in CLIP4Clip's file layout (``msrvtt_data.zip``); see ``docs/DATA.md``.

Files (under ``data_path``, a folder; the path of ``MSRVTT_data.json`` itself is accepted too,
as CLIP4Clip's ``--data_path`` points at it):

* ``MSRVTT_data.json``: ``{"info", "videos", "sentences"}``; sentences hold ``caption`` and ``video_id``;
* ``MSRVTT_train.9k.csv`` (default) or ``.7k.csv``: column ``video_id``;
* ``MSRVTT_JSFUSION_test.csv``: ``key,vid_key,video_id,sentence`` (the 1k-A test, one caption per video);
* videos ``<features_path>/<video_id>.mp4``, ``.webm`` as fallback.

Splits:

* ``"train"``: videos of ``train_csv``; with ``expand_sentences=True`` (default, the published
  setting) every caption of those videos is one sample, in ``MSRVTT_data.json`` order
  (180,000 on 9k); with False one sample per video (csv order) holding all its captions in
  ``Sample.captions``, so that ``RetrievalDataset`` draws one at random at every access;
* ``"test"``: the rows of ``test_csv`` (1k-A);
* ``"val"``: the rows of ``val_csv`` if given, else of the test csv, as CLIP4Clip does (MSR-VTT
  has no separate validation list in this layout); pass a held-out csv of the same format
  to select models on something other than the test set.

csv options are paths; a relative one that does not exist from the working directory is
looked up in the data folder. Tests: ``tests/examples/test_data_msrvtt.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .base import (
    AnnotationError,
    Sample,
    SplitReport,
    annotation_field,
    escapes_folder,
    frame_defaults,
    read_annotation_json,
)

__all__ = ["DEFAULTS", "OPTIONS", "load_split", "scan"]

DEFAULTS = {
    **frame_defaults(max_words=32, max_frames=12),
    "train_csv": "MSRVTT_train.9k.csv",
    "test_csv": "MSRVTT_JSFUSION_test.csv",
    "data_json": "MSRVTT_data.json",
    "expand_sentences": True,
}
OPTIONS = ("train_csv", "val_csv", "test_csv", "data_json", "expand_sentences")  # what scan/load_split read
SPLITS = ("train", "val", "test")
VIDEO_SUFFIXES = (".mp4", ".webm")


def _data_dir(data_path: str | Path) -> tuple[Path, Path | None]:
    data_path = Path(data_path)
    if data_path.suffix.lower() == ".json" and not data_path.is_dir():
        return data_path.parent, data_path
    return data_path, None


def _resolve(name: str | Path, data_dir: Path) -> Path:
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    return data_dir / p


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"MSR-VTT csv {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = fields
            missing = [c for c in required if c not in fields]
            if missing:
                raise AnnotationError(f"{path} must have columns {list(required)}, got header {fields}")
            rows = [{k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as err:
        raise AnnotationError(f"MSR-VTT csv {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except csv.Error as err:
        raise AnnotationError(f"MSR-VTT csv {path} cannot be parsed: {err}") from err
    for n, row in enumerate(rows, start=2):
        empty = [c for c in required if not row.get(c)]
        if empty:
            raise AnnotationError(f"{path} line {n}: empty {empty}")
    return rows


def video_path(features_path: str | Path, video_id: str) -> tuple[Path, bool]:
    """``<video_id>.mp4``, else ``.webm``; returns (path, exists) with the .mp4 path when neither exists."""
    features_path = Path(features_path)
    for suffix in VIDEO_SUFFIXES:
        p = features_path / f"{video_id}{suffix}"
        if p.is_file():
            return p, True
    return features_path / f"{video_id}{VIDEO_SUFFIXES[0]}", False


def _refuse_escaping(video_ids: list[str], features_path: Path, source: Path) -> tuple[list[str], dict[str, str]]:
    """Video ids whose file stays inside ``features_path``, and ``{refused id: file it came from}``."""
    refused = {v: source.name for v in video_ids
               if escapes_folder(features_path, v) or escapes_folder(features_path, f"{v}{VIDEO_SUFFIXES[0]}")}
    return [v for v in video_ids if v not in refused], refused


def scan(data_path: str | Path, features_path: str | Path, split: str, **options) -> SplitReport:
    """Read a split and match its videos on disk; ``load_split`` returns ``scan(...).samples``.

    Options: ``train_csv``, ``val_csv``, ``test_csv``, ``data_json`` (paths) and
    ``expand_sentences`` (bool); other keys of ``DEFAULTS`` are accepted and ignored here.
    """
    unknown = set(options) - set(DEFAULTS) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown MSR-VTT options {sorted(unknown)}; known: {sorted(set(DEFAULTS) | set(OPTIONS))}")
    if split not in SPLITS:
        raise ValueError(f"MSR-VTT split must be one of {SPLITS}, got {split!r}")
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    data_dir, json_path = _data_dir(data_path)
    features_path = Path(features_path)
    if not features_path.is_dir():
        raise FileNotFoundError(f"MSR-VTT video folder {features_path} does not exist")

    samples: list[Sample] = []
    unmatched: list[str] = []
    notes: list[str] = []
    if split == "train":
        csv_path = _resolve(opts["train_csv"], data_dir)
        video_ids = list(dict.fromkeys(r["video_id"] for r in _read_csv(csv_path, ("video_id",))))
        json_path = json_path or _resolve(opts["data_json"], data_dir)
        sentences = annotation_field(read_annotation_json(json_path, "MSR-VTT annotations"), "sentences", json_path,
                                     "the top level", list)
        wanted = set(video_ids)
        captions: dict[str, list[str]] = {v: [] for v in video_ids}
        pairs = []
        for n, itm in enumerate(sentences):
            vid = annotation_field(itm, "video_id", json_path, f"sentences[{n}]", str)
            if vid in wanted:
                caption = annotation_field(itm, "caption", json_path, f"sentences[{n}]", str)
                captions[vid].append(caption)
                pairs.append((vid, caption))
        unmatched = [f"{v} (in {csv_path.name}, no caption in {json_path.name})" for v in video_ids if not captions[v]]
        video_ids = [v for v in video_ids if captions[v]]
        video_ids, refused = _refuse_escaping(video_ids, features_path, csv_path)
        pairs = [(vid, cap) for vid, cap in pairs if vid not in refused]
        paths = {v: video_path(features_path, v) for v in video_ids}
        if opts["expand_sentences"]:
            samples = [Sample(vid, paths[vid][0], cap) for vid, cap in pairs]
        else:
            samples = [Sample(v, paths[v][0], captions[v][0], captions=tuple(captions[v])) for v in video_ids]
        n_captions = len(pairs)
        notes.append(f"train csv {csv_path}, expand_sentences={bool(opts['expand_sentences'])}")
    else:
        key = "val_csv" if split == "val" and opts.get("val_csv") else "test_csv"
        csv_path = _resolve(opts[key], data_dir)
        if split == "val" and key == "test_csv":
            notes.append(f"val uses the test csv {csv_path.name} (no val_csv given), as CLIP4Clip does")
        rows = _read_csv(csv_path, ("video_id", "sentence"))
        video_ids, refused = _refuse_escaping(list(dict.fromkeys(r["video_id"] for r in rows)), features_path,
                                              csv_path)
        rows = [r for r in rows if r["video_id"] not in refused]
        paths = {v: video_path(features_path, v) for v in video_ids}
        samples = [Sample(r["video_id"], paths[r["video_id"]][0], r["sentence"]) for r in rows]
        n_captions = len(rows)
        notes.append(f"{split} csv {csv_path}")

    missing = [f"{v} (looked for {v}.mp4 / {v}.webm)" for v in video_ids if not paths[v][1]]
    matched_by: dict[str, int] = {}
    for p, ok in paths.values():
        if ok:
            matched_by[p.suffix] = matched_by.get(p.suffix, 0) + 1
    return SplitReport(
        dataset="msrvtt",
        split=split,
        samples=samples,
        n_videos=len(video_ids),
        n_captions=n_captions,
        found=sum(ok for _, ok in paths.values()),
        missing=missing,
        unmatched=unmatched,
        matched_by=matched_by,
        notes=notes,
        refused=[f"{v} (in {src}: its file would be outside {features_path})" for v, src in refused.items()],
    )


def load_split(data_path: str | Path, features_path: str | Path, split: str, **options) -> list[Sample]:
    """Samples of an MSR-VTT split (see the module docstring); mismatches are logged.

    Videos without a file are kept (their path is ``<video_id>.mp4``): ``RetrievalDataset``
    raises on them unless ``skip_broken=True``.
    """
    report = scan(data_path, features_path, split, **options)
    report.log()
    return report.samples
