"""examples/tvr/data/validate.py: the counts printed before training."""

from __future__ import annotations

import pytest
from tvr.data.validate import validate

from tests.examples.fixtures import make_activitynet_fixture, make_didemo_fixture, make_msrvtt_fixture


def test_validate_msrvtt(tmp_path, capsys):
    fx = make_msrvtt_fixture(tmp_path / "msrvtt")
    out = validate("msrvtt", fx.data_path, fx.features_path, "train")
    assert (out["videos"], out["captions"], out["found"], out["missing"], out["unmatched"]) == (6, 18, 5, 1, 0)
    text = capsys.readouterr().out
    assert "msrvtt / train" in text and "video5" in text
    out = validate("msrvtt", fx.data_path, fx.features_path, "test", decode=True)
    assert out["undecodable"] == 1 and "video8.mp4" in out["undecodable_names"][0]


def test_validate_didemo_and_activitynet(tmp_path, capsys):
    fx = make_didemo_fixture(tmp_path / "didemo")
    out = validate("didemo", fx.data_path, fx.features_path, "train", show=1)
    assert (out["videos"], out["found"], out["missing"], out["unmatched"]) == (4, 3, 1, 2)
    assert out["matched_by"] == {"exact": 1, "stem": 1, "stripped": 1}
    assert "... and 1 more" in capsys.readouterr().out
    fx = make_activitynet_fixture(tmp_path / "anet")
    out = validate("activitynet", fx.data_path, fx.features_path, "val", decode=True)
    assert (out["videos"], out["captions"], out["found"], out["missing"], out["undecodable"]) == (2, 3, 2, 0, 0)
    with pytest.raises(ValueError, match="dataset_name"):
        validate("youcook2", fx.data_path, fx.features_path, "val")


def test_validate_msvd_and_lsmdc_count_missing_clips(tmp_path, capsys):
    from tests.examples.fixtures import make_lsmdc_fixture, make_msvd_fixture

    fx = make_msvd_fixture(tmp_path / "msvd")
    out = validate("msvd", fx.data_path, fx.features_path, "train")
    assert (out["videos"], out["captions"], out["found"], out["missing"], out["unmatched"]) == (5, 9, 4, 1, 1)
    assert out["matched_by"] == {".avi": 4}
    text = capsys.readouterr().out
    assert "msvd / train" in text and "gone_1_2" in text and "nocap_3_4" in text
    fx = make_lsmdc_fixture(tmp_path / "lsmdc")
    out = validate("lsmdc", fx.data_path, fx.features_path, "train", decode=True)
    assert (out["videos"], out["captions"], out["found"], out["missing"], out["undecodable"]) == (4, 5, 3, 1, 0)
    assert "0003_Missing_Movie_00.00.01.000-00.00.02.000" in capsys.readouterr().out
