"""encode_video: chunked == all at once == frame by frame, padded frames, bad input."""

import functools

import pytest
import torch
from backbone_helpers import make_openai_clip

from muse_pyramid.backbones import encode_video, openai_clip_tokens


@pytest.fixture(scope="module")
def encode():
    return functools.partial(openai_clip_tokens, make_openai_clip(seed=3).visual)


@torch.no_grad()
def test_chunks_give_the_same_tokens(encode):
    frames = torch.randn(2, 3, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # (B, T, 3, H, W)
    full = encode_video(encode, frames)
    assert full.shape == (2, 3, 17, 96)
    for chunk_size in (1, 4, 6, 100):  # 4 does not divide B*T = 6
        torch.testing.assert_close(encode_video(encode, frames, chunk_size=chunk_size), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[1, 2], encode(frames[1, 2:3])[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_padded_frames_are_skipped(encode):
    frames = torch.randn(2, 3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    calls = []

    def counting(images):
        calls.append(images.shape[0])
        return encode(images)

    out = encode_video(counting, frames, chunk_size=2, frame_mask=mask)
    assert calls == [2, 1]  # only the 3 real frames are encoded
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(out[mask], encode_video(encode, frames)[mask], rtol=1e-5, atol=1e-5)


def test_bad_input(encode):
    with pytest.raises(ValueError, match=r"frames must have shape \(B, T, 3, H, W\).*got shape \(2, 3, 64, 64\)"):
        encode_video(encode, torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 0"):
        encode_video(encode, torch.zeros(1, 1, 3, 64, 64), chunk_size=0)
    with pytest.raises(ValueError, match=r"frame_mask must have shape \(B, T\) = \(1, 2\)"):
        encode_video(encode, torch.zeros(1, 2, 3, 64, 64), frame_mask=torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"encode_fn must map images \(N, 3, H, W\) to tokens \(N, L, D\)"):
        encode_video(lambda x: x.mean(dim=(2, 3)), torch.zeros(1, 2, 3, 64, 64))
