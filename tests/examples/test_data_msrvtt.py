"""examples/tvr/data/msrvtt.py on a fixture in the exact MSR-VTT layout."""

from __future__ import annotations

import pytest
from tvr.data import DATASETS, msrvtt

from tests.examples.fixtures import make_msrvtt_fixture


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_msrvtt_fixture(tmp_path_factory.mktemp("msrvtt"), captions_per_video=3)


def test_train_expanded_every_caption_is_a_sample(fx):
    samples = msrvtt.load_split(fx.data_path, fx.features_path, "train")
    assert len(samples) == fx.expected["train_captions"] == 18
    # json order (captions interleaved across videos), only the 9k-csv videos
    assert [s.video_id for s in samples[:6]] == [f"video{i}" for i in range(6)]
    assert samples[6].text == "caption 1 of video0"
    assert all(s.captions == () and s.start is None and s.end is None for s in samples)


def test_train_one_sample_per_video_holds_all_captions(fx):
    samples = msrvtt.load_split(fx.data_path, fx.features_path, "train", expand_sentences=False)
    assert [s.video_id for s in samples] == [f"video{i}" for i in range(6)]
    assert samples[1].captions == ("caption 0 of video1", "caption 1 of video1", "caption 2 of video1")
    assert samples[1].text == "caption 0 of video1"


def test_webm_fallback_and_missing_video(fx):
    report = msrvtt.scan(fx.data_path, fx.features_path, "train")
    paths = {s.video_id: s.video_path for s in report.samples}
    assert paths["video2"].name == "video2.webm"
    assert paths["video5"].name == "video5.mp4" and not paths["video5"].exists()
    assert report.n_videos == 6 and report.found == 5
    assert [m.split()[0] for m in report.missing] == fx.expected["train_missing"]
    assert report.matched_by == {".mp4": 4, ".webm": 1}


def test_test_split_is_jsfusion_rows(fx):
    samples = msrvtt.load_split(fx.data_path, fx.features_path, "test")
    assert [(s.video_id, s.text) for s in samples] == [
        (v, f"test sentence for {v}") for v in ("video6", "video7", "video8")
    ]
    # val reads the test csv unless val_csv is given
    assert msrvtt.load_split(fx.data_path, fx.features_path, "val") == samples


def test_val_csv_needs_sentence_column(fx):
    with pytest.raises(ValueError, match="sentence"):
        msrvtt.load_split(fx.data_path, fx.features_path, "val", val_csv="MSRVTT_train.7k.csv")


def test_options_json_path_7k_and_errors(fx):
    json_path = fx.data_path / "MSRVTT_data.json"
    samples = msrvtt.load_split(json_path, fx.features_path, "train", train_csv=str(fx.data_path / "MSRVTT_train.7k.csv"))
    assert len(samples) == 4 * 3
    assert DATASETS["msrvtt"] is msrvtt and msrvtt.DEFAULTS["max_words"] == 32 and msrvtt.DEFAULTS["max_frames"] == 12
    with pytest.raises(TypeError, match="unknown MSR-VTT options"):
        msrvtt.load_split(fx.data_path, fx.features_path, "train", tarin_csv="x.csv")
    with pytest.raises(ValueError, match="split"):
        msrvtt.load_split(fx.data_path, fx.features_path, "validation")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        msrvtt.load_split(fx.data_path, fx.features_path, "train", train_csv="nope.csv")


def test_val_csv_selects_a_held_out_list(fx, tmp_path):
    held_out = tmp_path / "held_out.csv"
    held_out.write_text("key,vid_key,video_id,sentence\nret0,msr0,video0,a held out caption\n")
    val = msrvtt.load_split(fx.data_path, fx.features_path, "val", val_csv=str(held_out))
    assert [(s.video_id, s.text) for s in val] == [("video0", "a held out caption")]
