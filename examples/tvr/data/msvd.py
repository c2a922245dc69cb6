"""MSVD in CLIP4Clip's layout (``msvd_data.zip`` plus the YouTubeClips videos); see ``docs/reproduction.md``.

Files under ``data_path``:

* ``raw-captions.pkl``: a pickled dict ``{video_id: [caption, ...]}`` where each caption is a
  list of words (joined with single spaces here, as CLIP4Clip does); a plain string is accepted
  too. Only plain Python data is unpickled (dict, list, str): anything else is refused;
* ``train_list.txt`` / ``val_list.txt`` / ``test_list.txt``: one video id per line
  (1,200 / 100 / 670 videos in the public split).

Videos: ``<video_id>.<ext>`` anywhere under ``features_path`` (``YouTubeClips/*.avi`` in the
release), matched by the file name without its last extension; ids may start with ``-`` and
contain dots. The clip is the whole video.

Every split has one sample per caption, in list order then caption order (about 41 captions per
video). Training draws them all (CLIP4Clip's MSVD training set); evaluation ranks every caption
as a query against the distinct videos (text-to-video), and every video against all captions,
a hit on any of its own captions counting (video-to-text; see ``examples/tvr/metrics.py``).
Listed ids without captions are dropped and reported as unmatched (CLIP4Clip stops on them);
videos without a file are reported as missing (CLIP4Clip fails on them when it reads them); ids
that would point outside ``features_path`` are refused. A malformed file raises ``AnnotationError``
naming it.
Tests: ``tests/examples/test_data_msvd.py``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from .base import (
    AnnotationError,
    Sample,
    SplitReport,
    caption_split_report,
    check_scan_args,
    data_file,
    frame_defaults,
)

__all__ = ["DEFAULTS", "OPTIONS", "CAPTIONS_FILE", "load_split", "read_captions", "scan"]

DEFAULTS = frame_defaults(max_words=32, max_frames=12)
OPTIONS = ()  # what scan/load_split read besides DEFAULTS
CAPTIONS_FILE = "raw-captions.pkl"
SPLITS = ("train", "val", "test")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles built-in containers and strings only: no class is ever looked up."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only dicts, lists and strings are expected")


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """``raw-captions.pkl`` -> ``{video_id: [caption, ...]}`` with word lists joined by spaces."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MSVD captions {path} do not exist")
    try:
        raw = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # noqa: BLE001 - any malformed pickle; the unpickler builds no class, runs no code
        raise AnnotationError(f"{path} is not a pickled {{video_id: [caption, ...]}} dict: {err}") from err
    if not isinstance(raw, dict):
        raise AnnotationError(f"{path} must hold a dict {{video_id: [caption, ...]}}, got {type(raw).__name__}")
    out: dict[str, list[str]] = {}
    for vid, caps in raw.items():
        if not isinstance(vid, str) or not isinstance(caps, (list, tuple)):
            raise AnnotationError(f"{path}: entry {vid!r} must map a video id to a list of captions, got "
                             f"{type(caps).__name__}")
        texts = []
        for cap in caps:
            if isinstance(cap, str):
                texts.append(cap)
            elif isinstance(cap, (list, tuple)) and all(isinstance(w, str) for w in cap):
                texts.append(" ".join(cap))
            else:
                raise AnnotationError(f"{path}: a caption of {vid!r} must be a list of words or a string, got {cap!r}")
        out[vid] = texts
    return out


def scan(data_path: str | Path, features_path: str | Path, split: str, **options) -> SplitReport:
    """Read an MSVD split and match its videos on disk (``load_split`` returns ``.samples``).

    Options: the keys of ``DEFAULTS`` are accepted (frame settings; not read here).
    """
    check_scan_args("MSVD", split, SPLITS, options, [*DEFAULTS, *OPTIONS], features_path)
    list_path = data_file(data_path, f"{split}_list.txt")
    captions_path = data_file(data_path, CAPTIONS_FILE)
    if not list_path.is_file():
        raise FileNotFoundError(f"MSVD split list {list_path} does not exist")
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise AnnotationError(f"MSVD list {list_path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    listed = [v for v in dict.fromkeys(line.strip() for line in lines) if v]
    captions = read_captions(captions_path)
    unmatched = [f"{v} (in {list_path.name}, no caption in {captions_path.name})" for v in listed if not captions.get(v)]
    pairs = [(v, text) for v in listed for text in captions.get(v, ())]
    return caption_split_report("msvd", split, pairs, features_path, unmatched=unmatched,
                                notes=[f"{split} reads {list_path.name} and {captions_path.name}"])


def load_split(data_path: str | Path, features_path: str | Path, split: str, **options) -> list[Sample]:
    """One sample per caption of an MSVD split; every mismatch is logged."""
    report = scan(data_path, features_path, split, **options)
    report.log()
    return report.samples
