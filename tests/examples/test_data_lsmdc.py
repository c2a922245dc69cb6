"""examples/tvr/data/lsmdc.py on a fixture in the exact LSMDC layout (tab-separated csv files)."""

from __future__ import annotations

import pytest
from tvr.data import FrameConfig, RetrievalDataset, group_by_video, lsmdc
from tvr.data.base import AnnotationError

from tests.examples.fixtures import LSMDC_CLIPS, fake_tokenize, make_lsmdc_fixture, read_barcodes


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_lsmdc_fixture(tmp_path_factory.mktemp("lsmdc"))


def test_train_pairs_per_movie_folders_and_missing_clips(fx):
    report = lsmdc.scan(fx.data_path, fx.features_path, "train")
    exp = fx.expected["train"]
    assert (report.n_videos, report.n_captions, report.found) == (exp["videos"], exp["captions"], exp["found"])
    assert [s.text for s in report.samples] == exp["texts"]  # file order; a tab inside a sentence kept
    assert [m.split()[0] for m in report.missing] == exp["missing"]
    paths = {s.video_id: s.video_path for s in report.samples}
    clip = LSMDC_CLIPS["ab"]
    assert paths[clip].name == f"{clip}.avi" and paths[clip].parent.name == "0001_American_Beauty"
    assert paths[LSMDC_CLIPS["amelie"]].is_file() and not paths[LSMDC_CLIPS["gone"]].exists()
    videos, gt = group_by_video(report.samples)
    assert len(videos) == 4 and gt.tolist() == [0, 1, 0, 2, 3]  # one clip, two sentences


def test_test_split_and_frames(fx):
    samples = lsmdc.load_split(fx.data_path, fx.features_path, "test")
    assert [s.video_id for s in samples] == [LSMDC_CLIPS[k] for k in ("test1", "test2", "test3")]
    assert samples[2].text == "A pizza is delivered."
    ds = RetrievalDataset(samples[:1], fake_tokenize(), FrameConfig(max_frames=2, image_resolution=32))
    item = ds[0]
    assert read_barcodes(item["video"], item["video_mask"]) == [0, 4]  # frames 0, 2, 4; 2 kept uniformly
    val = lsmdc.scan(fx.data_path, fx.features_path, "val")
    assert (val.n_videos, val.found, val.missing) == (2, 2, [])


def test_malformed_lines_name_file_and_line(fx, tmp_path):
    (tmp_path / "LSMDC16_annos_val.csv").write_text("clip_a\t1\t2\t3\t4\tok\nclip_b\t1\t2\tshort\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"LSMDC16_annos_val.csv, line 2: expected 6 tab-separated fields"):
        lsmdc.scan(tmp_path, fx.features_path, "val")
    (tmp_path / "LSMDC16_annos_val.csv").write_bytes(b"clip_a\t1\t2\t3\t4\tcaf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(AnnotationError, match="not UTF-8"):
        lsmdc.scan(tmp_path, fx.features_path, "val")
    (tmp_path / "LSMDC16_annos_val.csv").write_text("../../outside\t1\t2\t3\t4\tno\nclip_a\t1\t2\t3\t4\tok\n",
                                                  encoding="utf-8")
    report = lsmdc.scan(tmp_path, fx.features_path, "val")
    assert [r.split()[0] for r in report.refused] == ["../../outside"] and report.n_videos == 1
    with pytest.raises(FileNotFoundError, match="LSMDC16_challenge_1000_publictect.csv"):
        lsmdc.scan(tmp_path, fx.features_path, "test")
    with pytest.raises(ValueError, match="split"):
        lsmdc.scan(fx.data_path, fx.features_path, "public_test")
    with pytest.raises(TypeError, match="unknown LSMDC options"):
        lsmdc.scan(fx.data_path, fx.features_path, "test", test_csv="x.csv")
