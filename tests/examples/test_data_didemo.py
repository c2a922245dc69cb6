"""examples/tvr/data/didemo.py on a fixture in the exact DiDeMo layout."""

from __future__ import annotations

import pytest
from tvr.data import FrameConfig, RetrievalDataset, didemo

from tests.examples.fixtures import fake_tokenize, make_didemo_fixture, read_barcodes


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_didemo_fixture(tmp_path_factory.mktemp("didemo"))


def test_matching_exact_stem_doubled_extension_and_report(fx):
    report = didemo.scan(fx.data_path, fx.features_path, "train")
    exp = fx.expected["train"]
    assert (report.n_videos, report.n_captions, report.found) == (exp["videos"], exp["captions"], exp["found"])
    assert report.matched_by == exp["matched_by"]
    assert [m.split()[0] for m in report.missing] == exp["missing"]
    # e@N00_5.mp4 is listed without annotations; z@N00_9.mp4 is annotated but not listed
    assert sorted(u.split()[0] for u in report.unmatched) == ["e@N00_5.mp4", "z@N00_9.mp4"]
    paths = {s.video_id: s.video_path for s in report.samples}
    assert paths["a@N00_1.mov"].name == "a@N00_1.mov"
    assert paths["b@N00_2.avi"].name == "b@N00_2.mp4"
    assert paths["c@N00_3.mov"].name == "c@N00_3.mov.mp4"
    assert not paths["d@N00_4.m4v"].exists()


def test_paragraphs_in_file_order_and_31s_clip(fx):
    samples = didemo.load_split(fx.data_path, fx.features_path, "train")
    texts = {s.video_id: s.text for s in samples}
    for vid, text in fx.expected["paragraphs"].items():
        assert texts[vid] == text
    assert all(s.start == 0.0 and s.end == 31.0 for s in samples)
    assert [s.video_id for s in samples] == ["a@N00_1.mov", "b@N00_2.avi", "c@N00_3.mov", "d@N00_4.m4v"]


def test_long_video_reads_seconds_0_to_31(fx):
    samples = didemo.load_split(fx.data_path, fx.features_path, "test")
    long = next(s for s in samples if s.video_id == fx.expected["long"])
    ds = RetrievalDataset([long], fake_tokenize(), FrameConfig(max_frames=64, image_resolution=32))
    item = ds[0]
    # 40 s at 2 fps: seconds 0..31 inclusive -> 32 frames, as CLIP4Clip (end = 31)
    assert read_barcodes(item["video"], item["video_mask"]) == list(range(0, 64, 2))
    assert int(item["video_mask"].sum()) == 32


def test_corrupt_video_is_skipped_only_when_asked(fx):
    samples = didemo.load_split(fx.data_path, fx.features_path, "test")
    ds = RetrievalDataset(samples, fake_tokenize(), FrameConfig(max_frames=4, image_resolution=32), skip_broken=True)
    assert len(ds) == 1 and [s.video_id for s, _ in ds.skipped] == [fx.expected["corrupt"]]


def test_errors(fx):
    with pytest.raises(ValueError, match="split"):
        didemo.load_split(fx.data_path, fx.features_path, "dev")
    with pytest.raises(FileNotFoundError, match="train_list.txt"):
        didemo.load_split(fx.features_path, fx.features_path, "train")
    assert didemo.DEFAULTS["max_words"] == 64 and didemo.DEFAULTS["max_frames"] == 64
