"""Tests for muse_pyramid.aggregate: token orders, padding moved behind real tokens, CLS positions."""

import pytest
import torch

from muse_pyramid import ScaleAggregator


def _inputs(b=2, t=3, sizes=(1, 4), c=2):
    """CLS and levels whose values encode (video, frame, level, token) so orders can be read back."""
    cls = torch.zeros(b, t, c)
    for i in range(b):
        for f in range(t):
            cls[i, f] = torch.tensor([i, 1000 + f], dtype=torch.float)
    levels = []
    for k, s in enumerate(sizes):
        lv = torch.zeros(b, t, s, c)
        for i in range(b):
            for f in range(t):
                for j in range(s):
                    lv[i, f, j] = torch.tensor([i, (k + 1) * 10000 + f * 100 + j], dtype=torch.float)
        levels.append(lv)
    return cls, levels


def _codes(seq):
    return seq[..., 1].long().tolist()


def test_scale_wise_order():
    cls, levels = _inputs()
    out = ScaleAggregator("scale_wise")(cls, levels)
    expect = [1000, 1001, 1002, 10000, 10100, 10200] + [20000 + f * 100 + j for f in range(3) for j in range(4)]
    assert _codes(out.tokens[0]) == expect
    assert out.mask is None
    assert out.cls_index.tolist() == [[0, 1, 2]] * 2


def test_frame_wise_order():
    cls, levels = _inputs()
    out = ScaleAggregator("frame_wise")(cls, levels)
    expect = []
    for f in range(3):
        expect += [1000 + f, 10000 + f * 100] + [20000 + f * 100 + j for j in range(4)]
    assert _codes(out.tokens[1]) == expect
    assert out.cls_index.tolist() == [[0, 6, 12]] * 2


def test_spatial_wise_averages_over_real_frames():
    cls, levels = _inputs()
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    out = ScaleAggregator("spatial_wise")(cls, levels, mask)
    assert out.tokens.shape == (2, 3 + 1 + 4, 2)
    # video 1: real CLS (frames 0, 2), then level means over frames 0 and 2, then the padded CLS.
    assert _codes(out.tokens[1])[:2] == [1000, 1002]
    torch.testing.assert_close(out.tokens[1, 2, 1], torch.tensor((10000.0 + 10200.0) / 2))
    assert _codes(out.tokens[1])[-1] == 1001
    assert out.mask[1].tolist() == [True] * 7 + [False]
    assert out.cls_index[1].tolist() == [0, 7, 1]


@pytest.mark.parametrize("mode", ["scale_wise", "frame_wise", "spatial_wise"])
def test_padded_video_starts_with_the_sequence_of_its_real_frames(mode):
    cls, levels = _inputs(b=2, t=4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    agg = ScaleAggregator(mode)
    padded = agg(cls, levels, mask)
    alone = agg(cls[1:, :2], [lv[1:, :2] for lv in levels])
    n = alone.tokens.shape[1]
    torch.testing.assert_close(padded.tokens[1, :n], alone.tokens[0])
    assert padded.mask[1, :n].all() and not padded.mask[1, n:].any()
    assert padded.cls_index[1, :2].tolist() == alone.cls_index[0].tolist()
    # every frame's CLS is found where cls_index says
    got = padded.tokens.gather(1, padded.cls_index[..., None].expand(-1, -1, 2))
    torch.testing.assert_close(got, cls)


def test_sequence_length():
    assert ScaleAggregator("scale_wise").sequence_length(12, [9, 49, 196]) == 3060
    assert ScaleAggregator("frame_wise").sequence_length(64, [49, 196, 784]) == 65920
    assert ScaleAggregator("spatial_wise").sequence_length(12, [9, 49, 196]) == 12 + 254


def test_errors():
    cls, levels = _inputs()
    with pytest.raises(ValueError, match=r"mode must be one of .*'temporal'"):
        ScaleAggregator("temporal")
    agg = ScaleAggregator()
    with pytest.raises(ValueError, match=r"frame_mask must have shape \(B, T\) = \(2, 3\), got shape \(2, 4\)"):
        agg(cls, levels, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"no real frame for video\(s\) \[1\]"):
        agg(cls, levels, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"levels\[1\] must have shape \(B, T, S_k, C\)"):
        agg(cls, [levels[0], levels[1][:, :2]])
    with pytest.raises(ValueError, match="at least one"):
        agg(cls, [])
