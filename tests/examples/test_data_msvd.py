"""examples/tvr/data/msvd.py on a fixture in the exact MSVD layout (raw-captions.pkl + split lists)."""

from __future__ import annotations

import pickle

import pytest
from tvr.data import FrameConfig, RetrievalDataset, group_by_video, msvd

from tests.examples.fixtures import fake_tokenize, make_msvd_fixture, read_barcodes


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_msvd_fixture(tmp_path_factory.mktemp("msvd"))


def test_train_has_every_caption_and_reports_mismatches(fx):
    report = msvd.scan(fx.data_path, fx.features_path, "train")
    exp = fx.expected["train"]
    assert (report.n_videos, report.n_captions, report.found) == (exp["videos"], exp["captions"], exp["found"])
    assert len(report.samples) == exp["captions"]
    assert [m.split()[0] for m in report.missing] == exp["missing"]
    assert [u.split()[0] for u in report.unmatched] == exp["unmatched"]
    assert report.matched_by == {".avi": 4}
    by_id: dict = {}
    for s in report.samples:
        by_id.setdefault(s.video_id, []).append(s)
    for vid, texts in exp["text"].items():
        assert [s.text for s in by_id[vid]] == texts  # words joined, file order, non-ASCII kept
    # odd ids: a leading dash, a dot inside, non-ASCII letters
    assert by_id["-4wsuPCjDBc_5_15"][0].video_path.name == "-4wsuPCjDBc_5_15.avi"
    assert by_id["mv.89_1_2"][0].video_path.name == "mv.89_1_2.avi"
    assert by_id["ñandú_0_4"][0].video_path.name == "ñandú_0_4.avi"
    assert not by_id["gone_1_2"][0].video_path.exists()
    assert all(s.start is None and s.end is None for s in report.samples)  # the whole video


def test_test_split_groups_many_captions_per_video(fx):
    samples = msvd.load_split(fx.data_path, fx.features_path, "test")
    videos, gt = group_by_video(samples)
    assert [v.video_id for v in videos] == ["t1_0_3", "t2_1_4", "t3_2_6"]
    assert gt.bincount().tolist() == fx.expected["test"]["per_video"]
    assert samples[3].text == "a plain string caption"
    ds = RetrievalDataset(videos[:1], fake_tokenize(), FrameConfig(max_frames=8, image_resolution=32))
    item = ds[0]
    assert read_barcodes(item["video"], item["video_mask"]) == [0, 2, 4]  # 3 s at 2 fps, 1 frame per second


def test_unpickling_refuses_objects(fx, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("never",))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train_list.txt").write_text("x\n", encoding="utf-8")
    (bad / "raw-captions.pkl").write_bytes(pickle.dumps({"x": [Evil()]}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        msvd.scan(bad, fx.features_path, "train")
    (bad / "raw-captions.pkl").write_bytes(pickle.dumps({"x": [[1, 2]]}))
    with pytest.raises(ValueError, match="list of words"):
        msvd.scan(bad, fx.features_path, "train")
    # an id pointing outside the video folder is refused, named and counted
    (bad / "train_list.txt").write_text("../x\nx\n", encoding="utf-8")
    (bad / "raw-captions.pkl").write_bytes(pickle.dumps({"../x": [["up"]], "x": [["here"]]}))
    report = msvd.scan(bad, fx.features_path, "train")
    assert [r.split()[0] for r in report.refused] == ["../x"] and [s.text for s in report.samples] == ["here"]


def test_errors(fx, tmp_path):
    with pytest.raises(ValueError, match="split"):
        msvd.load_split(fx.data_path, fx.features_path, "validate")
    with pytest.raises(TypeError, match="unknown MSVD options"):
        msvd.load_split(fx.data_path, fx.features_path, "test", train_csv="x.csv")
    with pytest.raises(FileNotFoundError, match="raw-captions.pkl"):
        (tmp_path / "test_list.txt").write_text("a\n", encoding="utf-8")
        msvd.load_split(tmp_path, fx.features_path, "test")
    with pytest.raises(FileNotFoundError, match="video folder"):
        msvd.load_split(fx.data_path, tmp_path / "nowhere", "test")


@pytest.mark.parametrize("payload", [b"\x80\x02}(K\x01]e.", b"\x80\x02]q\x00.", b"not a pickle"])
def test_malformed_captions_pickle_is_an_annotation_error(tmp_path, payload):
    from tvr.data.base import AnnotationError
    from tvr.data.msvd import read_captions

    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(payload)
    with pytest.raises(AnnotationError, match="raw-captions.pkl"):
        read_captions(path)
