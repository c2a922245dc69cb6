"""Check a benchmark split before training: counts of videos, captions, files found, missing, unmatched.

``validate("didemo", data_path, features_path, "test")`` prints a summary and every
mismatch, and returns the counts as a dict; with ``decode=True`` it also opens every
video found and decodes its first frame (``undecodable`` lists the failures).
The entry points expose it as their ``validate`` command. Tests:
``tests/examples/test_data_validate.py``.
"""

from __future__ import annotations

from pathlib import Path

from ..video import probe_video
from . import DATASETS

__all__ = ["validate"]


def validate(
    dataset_name: str,
    data_path: str | Path,
    features_path: str | Path,
    split: str,
    decode: bool = False,
    show: int | None = None,
    **options,
) -> dict:
    """Read ``split`` of ``dataset_name`` and report what matches on disk.

    Args:
        dataset_name: a key of ``DATASETS`` (``msrvtt``, ``didemo``, ``activitynet``, ``msvd``, ``lsmdc``).
        data_path, features_path, split, options: as for that data set's ``load_split``.
        decode: also probe every found video (open it, decode its first frame).
        show: print at most this many names per mismatch list (``None``: all of them).

    Returns:
        ``{"dataset", "split", "videos", "captions", "samples", "found", "missing", "unmatched",
        "refused", "matched_by", "missing_names", "unmatched_names", "refused_names", "notes"}`` and, with
        ``decode``, ``"undecodable"`` (count) and ``"undecodable_names"``.
    """
    if dataset_name not in DATASETS:
        raise ValueError(f"dataset_name must be one of {sorted(DATASETS)}, got {dataset_name!r}")
    report = DATASETS[dataset_name].scan(data_path, features_path, split, **options)
    result = report.as_dict()
    if decode:
        present = list(dict.fromkeys(s.video_path for s in report.samples if Path(s.video_path).is_file()))
        bad = [(p, r) for p in present if (r := probe_video(p)) is not None]
        result["undecodable"] = len(bad)
        result["undecodable_names"] = [f"{p} ({r})" for p, r in bad]

    lines = [
        f"{dataset_name} / {split}",
        f"  videos     {result['videos']:>8}",
        f"  captions   {result['captions']:>8}",
        f"  samples    {result['samples']:>8}",
        f"  found      {result['found']:>8}   " + ", ".join(f"{k}: {v}" for k, v in result["matched_by"].items()),
        f"  missing    {result['missing']:>8}",
        f"  unmatched  {result['unmatched']:>8}",
        f"  refused    {result['refused']:>8}   (names pointing outside the video folder)",
    ]
    if decode:
        lines.append(f"  undecodable{result['undecodable']:>7}")
    for title, names in (
        ("missing", result["missing_names"]),
        ("unmatched", result["unmatched_names"]),
        ("refused", result["refused_names"]),
        ("undecodable", result.get("undecodable_names", [])),
    ):
        if names:
            lines.append(f"  {title}:")
            lines += [f"    {n}" for n in names[:show]]
            if show is not None and len(names) > show:
                lines.append(f"    ... and {len(names) - show} more")
    lines += [f"  note: {n}" for n in result["notes"]]
    print("\n".join(lines))
    return result
