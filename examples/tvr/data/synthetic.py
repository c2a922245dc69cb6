"""A small synthetic data set in the exact MSR-VTT file format, for demos and tests.

Each video shows one big solid shape (circle, square or triangle) of one colour moving in
one direction (left, right, up, down) over a plain background; its captions say exactly
that, with several templates ("a red circle moves left on a gray background", ...). The
visual factors are chosen to be learnable by a small random-initialised CLIP in minutes on
CPU: large shapes, saturated and mutually distinct colours, and every test video uses an
attribute combination that also occurs in training (with a different size, path and speed).
Colour and shape are visible in every frame; the motion direction needs the frame order.

Files written under ``root`` (as CLIP4Clip's ``msrvtt_data.zip``):
``MSRVTT_data.json``, ``MSRVTT_train.9k.csv``, ``MSRVTT_JSFUSION_test.csv`` and
``videos/<video_id>.mp4``. Load them with ``msrvtt.load_split(root, root / "videos", split)``.
Tests: ``tests/examples/test_data_synthetic.py``.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..video import write_video

__all__ = ["BACKGROUNDS", "COLOURS", "DIRECTIONS", "SHAPES", "SyntheticMSRVTT", "make_synthetic_msrvtt", "render_clip"]

COLOURS = {
    "red": (230, 25, 25),
    "green": (30, 200, 40),
    "blue": (30, 60, 235),
    "yellow": (245, 225, 20),
    "white": (250, 250, 250),
}
BACKGROUNDS = {
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
    "purple": (110, 30, 140),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_DIRECTION_WORDS = {
    "left": ("left", "to the left"),
    "right": ("right", "to the right"),
    "up": ("up", "upward"),
    "down": ("down", "downward"),
}
TEMPLATES = (
    "a {c} {s} moves {d} on a {b} background",
    "a {c} {s} moving {d} over a {b} background",
    "{c} {s} going {d} against {b}",
    "on a {b} background a {c} {s} slides {d}",
    "a {s} that is {c} travels {d} across a {b} screen",
    "the {c} {s} heads {d} in front of a {b} backdrop",
    "a {b} scene with a {c} {s} moving {d}",
    "animation of a {c} {s} going {d} on {b}",
)


@dataclass(frozen=True)
class SyntheticMSRVTT:
    """Paths of a generated data set, named after CLIP4Clip's flags."""

    root: Path
    data_path: Path  # MSRVTT_data.json
    train_csv: Path  # MSRVTT_train.9k.csv
    test_csv: Path  # MSRVTT_JSFUSION_test.csv
    features_path: Path  # folder of <video_id>.mp4
    n_train: int
    n_test: int


def render_clip(
    colour: str, shape: str, direction: str, background: str, n_frames: int, size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n_frames, size, size, 3) uint8 frames of one shape moving across the frame."""
    radius = size * rng.uniform(0.17, 0.24)
    dx, dy = DIRECTIONS[direction]
    travel = size * rng.uniform(0.45, 0.6)  # distance covered over the clip
    lateral = size * 0.5 + size * rng.uniform(-0.12, 0.12)  # position across the motion axis
    begin = size * 0.5 - travel / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUNDS[background]
    for t in range(n_frames):
        along = begin + travel * (t / max(n_frames - 1, 1))
        if dx:
            cx = along if dx > 0 else size - along
            cy = lateral
        else:
            cy = along if dy > 0 else size - along
            cx = lateral
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        elif shape == "square":
            mask = (np.abs(xx - cx) <= radius * 0.9) & (np.abs(yy - cy) <= radius * 0.9)
        else:  # upward-pointing triangle inscribed in the circle
            top, bottom = cy - radius, cy + radius * 0.7
            half = (yy - top) / (bottom - top) * radius * 1.1
            mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
        frames[t][mask] = COLOURS[colour]
    return frames


def _caption(rng: np.random.Generator, attrs: tuple[str, str, str, str]) -> str:
    c, s, d, b = attrs
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    words = _DIRECTION_WORDS[d]
    return template.format(c=c, s=s, d=words[rng.integers(len(words))], b=b)


def make_synthetic_msrvtt(
    root: str | Path,
    n_train_videos: int = 200,
    n_test_videos: int = 50,
    seconds: int = 6,
    fps: int = 4,
    size: int = 64,
    seed: int = 0,
    captions_per_video: int = 20,
) -> SyntheticMSRVTT:
    """Write the data set under ``root`` and return its paths.

    Args:
        root: output folder (created).
        n_train_videos, n_test_videos: videos per split; the test captions are one per video
            (the 1k-A layout), training videos get ``captions_per_video`` each (MSR-VTT has 20).
        seconds, fps: clip length; CLIP4Clip's frame rule reads ``seconds`` frames.
        size: frame side in pixels (even).
        seed: everything (attributes, paths, captions) follows from it.
    """
    if n_train_videos < 1 or n_test_videos < 1:
        raise ValueError(f"need at least one train and one test video, got {n_train_videos}, {n_test_videos}")
    if seconds < 1 or fps < 1 or captions_per_video < 1:
        raise ValueError(f"seconds, fps and captions_per_video must be >= 1, got {seconds}, {fps}, {captions_per_video}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    root = Path(root)
    video_dir = root / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS))
    order = rng.permutation(len(combos))
    # training covers as many combinations as it can, round-robin; test reuses training ones
    train_attrs = [combos[order[i % len(combos)]] for i in range(n_train_videos)]
    seen = sorted(set(train_attrs))
    test_attrs = [seen[k] for k in rng.permutation(np.resize(np.arange(len(seen)), n_test_videos))]

    videos, sentences, test_rows = [], [], []
    n_frames = seconds * fps
    for i, attrs in enumerate(train_attrs + test_attrs):
        vid = f"video{i}"
        split = "train" if i < n_train_videos else "test"
        write_video(video_dir / f"{vid}.mp4", render_clip(*attrs, n_frames=n_frames, size=size, rng=rng), fps)
        videos.append({
            "category": int(rng.integers(20)),
            "url": f"https://www.youtube.com/watch?v=synthetic{i:05d}",
            "video_id": vid,
            "start time": 0.0,
            "end time": float(seconds),
            "split": split,
            "id": i,
        })
        caps = [_caption(rng, attrs) for _ in range(captions_per_video)]
        for cap in caps:
            sentences.append({"caption": cap, "video_id": vid, "sen_id": len(sentences)})
        if split == "test":
            test_rows.append((f"ret{len(test_rows)}", f"msr{i}", vid, caps[0]))

    data_path = root / "MSRVTT_data.json"
    info = {"contributor": "muse-pyramid synthetic", "data_created": "2016-04-01 12:00:00", "version": "1.0",
            "year": "2016"}
    with open(data_path, "w", encoding="utf-8") as f:
        json.dump({"info": info, "videos": videos, "sentences": sentences}, f)
    train_csv = root / "MSRVTT_train.9k.csv"
    with open(train_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["video_id"])
        w.writerows([v["video_id"]] for v in videos[:n_train_videos])
    test_csv = root / "MSRVTT_JSFUSION_test.csv"
    with open(test_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        w.writerows(test_rows)
    return SyntheticMSRVTT(root, data_path, train_csv, test_csv, video_dir, n_train_videos, n_test_videos)
