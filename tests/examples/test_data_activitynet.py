"""examples/tvr/data/activitynet.py on a fixture in the exact ActivityNet Captions layout."""

from __future__ import annotations

import pytest
from tvr.data import FrameConfig, RetrievalDataset, activitynet

from tests.examples.fixtures import fake_tokenize, make_activitynet_fixture, read_barcodes


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_activitynet_fixture(tmp_path_factory.mktemp("anet"))


def test_train_counts_names_with_and_without_v_prefix(fx):
    report = activitynet.scan(fx.data_path, fx.features_path, "train")
    exp = fx.expected["train"]
    assert (report.n_videos, report.n_captions, report.found) == (exp["videos"], exp["captions"], exp["found"])
    assert [m.split()[0] for m in report.missing] == exp["missing"]
    assert [u.split()[0] for u in report.unmatched] == exp["unmatched"]
    assert report.matched_by == {"v_ name": 1, "name without v_": 1}
    paths = {s.video_id: s.video_path for s in report.samples}
    assert paths["v_AAA"].name == "v_AAA.mp4" and paths["v_BBB"].name == "BBB.mkv"
    assert not paths["v_CCC"].exists()


def test_text_whitespace_and_clip_bounds(fx):
    samples = activitynet.load_split(fx.data_path, fx.features_path, "train")
    by_id = {s.video_id: s for s in samples}
    for vid, text in fx.expected["train"]["text"].items():
        assert by_id[vid].text == text
    assert (by_id["v_AAA"].start, by_id["v_AAA"].end) == (0.0, 6.0)  # ceil(5.2)
    ds = RetrievalDataset([by_id["v_AAA"]], fake_tokenize(), FrameConfig(max_frames=8, image_resolution=32))
    item = ds[0]
    assert read_barcodes(item["video"], item["video_mask"]) == [0, 3, 6, 9, 12]


def test_val_and_test_read_val_1(fx):
    val = activitynet.load_split(fx.data_path, fx.features_path, "val")
    test = activitynet.load_split(fx.data_path, fx.features_path, "test")
    assert val == test and [s.video_id for s in val] == ["v_EEE", "v_FFF"]
    assert val[0].video_path.name == "EEE.webm" and val[1].text == "One. Two."
    # a separate file for one split
    other = activitynet.load_split(fx.data_path, fx.features_path, "test", test_json="train.json", test_ids="train_ids.json")
    assert [s.video_id for s in other] == ["v_AAA", "v_BBB", "v_CCC"]


def test_errors(fx):
    with pytest.raises(ValueError, match="split"):
        activitynet.load_split(fx.data_path, fx.features_path, "val_2")
    with pytest.raises(TypeError, match="unknown ActivityNet options"):
        activitynet.load_split(fx.data_path, fx.features_path, "val", val_file="x.json")
