"""LSMDC (Large Scale Movie Description Challenge 2016) in CLIP4Clip's layout; see ``docs/reproduction.md``.

Files under ``data_path``, tab-separated, no header, one clip-sentence pair per line:

    <clip_id> \\t <start_aligned> \\t <end_aligned> \\t <start_extracted> \\t <end_extracted> \\t <sentence>

* ``"train"``: ``LSMDC16_annos_training.csv`` (101,079 pairs in the public release);
* ``"val"``: ``LSMDC16_annos_val.csv`` (7,408);
* ``"test"``: ``LSMDC16_challenge_1000_publictect.csv`` (1,000 clips, one sentence each).

A clip id may come with several sentences (each is a sample). A sentence holding a tab keeps it
(the line is split at its first five tabs); a line with fewer than six fields is an error naming
the file and line (``AnnotationError``). The time columns are not read: the clip files are already
cut. A clip id that would point outside ``features_path`` is refused (reported, dropped).

Clips: ``<clip_id>.<ext>`` anywhere under ``features_path`` (one folder per movie in the
release), matched by the file name without its last extension; ids contain dots and dashes
(``0001_American_Beauty_00.00.51.926-00.00.54.129``). CLIP4Clip silently drops the pairs of clips
it does not find; here they are reported as missing (and counted), and ``RetrievalDataset``
fails on them unless ``skip_broken=True``. Tests: ``tests/examples/test_data_lsmdc.py``.
"""

from __future__ import annotations

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

__all__ = ["DEFAULTS", "OPTIONS", "FILES", "load_split", "read_annotations", "scan"]

DEFAULTS = frame_defaults(max_words=32, max_frames=12)
OPTIONS = ()  # what scan/load_split read besides DEFAULTS
FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
N_FIELDS = 6


def read_annotations(path: str | Path) -> list[tuple[str, str]]:
    """``(clip_id, sentence)`` of every non-blank line of an LSMDC annotation file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LSMDC annotations {path} do not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"LSMDC annotations {path} are not UTF-8 text ({err.reason} at byte {err.start})") from err
    pairs = []
    for number, line in enumerate(text.split("\n"), start=1):  # only \n (and \r\n) end a line
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t", N_FIELDS - 1)
        if len(fields) < N_FIELDS:
            raise AnnotationError(f"{path}, line {number}: expected {N_FIELDS} tab-separated fields (clip id, four "
                                  f"times, sentence), got {len(fields)}: {line[:120]!r}")
        clip_id, sentence = fields[0].strip(), fields[-1].strip()
        if not clip_id:
            raise AnnotationError(f"{path}, line {number}: empty clip id")
        pairs.append((clip_id, sentence))
    return pairs


def scan(data_path: str | Path, features_path: str | Path, split: str, **options) -> SplitReport:
    """Read an LSMDC split and match its clips on disk (``load_split`` returns ``.samples``).

    Options: the keys of ``DEFAULTS`` are accepted (frame settings; not read here).
    """
    check_scan_args("LSMDC", split, FILES, options, [*DEFAULTS, *OPTIONS], features_path)
    path = data_file(data_path, FILES[split])
    return caption_split_report("lsmdc", split, read_annotations(path), features_path,
                                notes=[f"{split} reads {path.name}"])


def load_split(data_path: str | Path, features_path: str | Path, split: str, **options) -> list[Sample]:
    """One sample per clip-sentence pair of an LSMDC split; every mismatch is logged."""
    report = scan(data_path, features_path, split, **options)
    report.log()
    return report.samples
