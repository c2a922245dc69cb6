"""examples/tvr/data/synthetic.py: a synthetic data set in the exact MSR-VTT format."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from tvr.data import FrameConfig, RetrievalDataset, msrvtt
from tvr.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    make_synthetic_msrvtt,
    render_clip,
)
from tvr.video import denormalize

from tests.examples.fixtures import fake_tokenize


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic_msrvtt(tmp_path_factory.mktemp("syn"), n_train_videos=8, n_test_videos=4, seconds=3,
                                 fps=2, size=32, seed=3, captions_per_video=5)


def _attributes(caption: str) -> tuple:
    words = [w.removesuffix("ward") for w in caption.split()]  # "upward" -> "up"
    pick = lambda names: next(w for w in words if w in names)  # noqa: E731
    return pick(COLOURS), pick(SHAPES), pick(DIRECTIONS), pick(BACKGROUNDS)


def test_files_follow_msrvtt_format(syn):
    with open(syn.data_path) as f:
        data = json.load(f)
    assert set(data) == {"info", "videos", "sentences"}
    assert set(data["videos"][0]) == {"category", "url", "video_id", "start time", "end time", "split", "id"}
    assert set(data["sentences"][0]) == {"caption", "video_id", "sen_id"}
    assert len(data["videos"]) == 12 and len(data["sentences"]) == 12 * 5
    with open(syn.train_csv, newline="") as f:
        assert next(csv.reader(f)) == ["video_id"]
    with open(syn.test_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["key", "vid_key", "video_id", "sentence"] and len(rows) == 5
    assert len(msrvtt.load_split(syn.root, syn.features_path, "train")) == 8 * 5
    assert len(msrvtt.load_split(syn.data_path, syn.features_path, "test")) == 4


def test_captions_describe_the_video_and_test_combos_are_seen_in_training(syn):
    with open(syn.data_path) as f:
        data = json.load(f)
    per_video: dict[str, set] = {}
    for s in data["sentences"]:
        per_video.setdefault(s["video_id"], set()).add(_attributes(s["caption"]))
    assert all(len(a) == 1 for a in per_video.values())  # every caption of a video says the same thing
    split = {v["video_id"]: v["split"] for v in data["videos"]}
    train = {next(iter(a)) for v, a in per_video.items() if split[v] == "train"}
    test = {next(iter(a)) for v, a in per_video.items() if split[v] == "test"}
    assert test <= train


def test_rendered_colours_are_visible_in_decoded_frames(syn):
    samples = msrvtt.load_split(syn.data_path, syn.features_path, "test")
    item = RetrievalDataset(samples, fake_tokenize(), FrameConfig(max_frames=4, image_resolution=32))[0]
    colour, _, _, background = _attributes(samples[0].text)
    frame = denormalize(item["video"][0]) * 255  # (3, R, R)
    corner = frame[:, 0, 0]
    assert torch.allclose(corner, torch.tensor(BACKGROUNDS[background], dtype=torch.float32), atol=20)
    dist = (frame - torch.tensor(COLOURS[colour], dtype=torch.float32).view(3, 1, 1)).abs().amax(dim=0)
    assert (dist < 30).float().mean() > 0.05  # the shape covers a good part of the frame
    assert item["video_mask"].tolist() == [1, 1, 1, 0]


def test_motion_direction_and_determinism(tmp_path, syn):
    rng = np.random.default_rng(0)
    frames = render_clip("red", "square", "right", "black", n_frames=5, size=32, rng=rng)
    xs = [float((f[..., 0] > 128).nonzero()[1].mean()) for f in frames]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 8
    again = make_synthetic_msrvtt(tmp_path, n_train_videos=8, n_test_videos=4, seconds=3, fps=2, size=32, seed=3,
                                  captions_per_video=5)
    assert again.data_path.read_text() == syn.data_path.read_text()
    with pytest.raises(ValueError, match="size"):
        make_synthetic_msrvtt(tmp_path, size=33)
