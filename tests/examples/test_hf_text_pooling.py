"""examples/hf_text_pooling.py: MUSE in a Hugging Face CLIP pipeline with X-Pool-style text-conditioned pooling."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from muse_pyramid import MUSEHead  # noqa: E402

PATH = Path(__file__).resolve().parents[2] / "examples" / "hf_text_pooling.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("hf_text_pooling", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_text_pooling"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["hf_text_pooling"]


def _models(ex):
    clip = ex.tiny_clip()
    torch.manual_seed(1)
    muse = ex.HFVideoRetrieval(clip, MUSEHead(clip.config.projection_dim, d_state=4)).eval()
    plain = ex.HFVideoRetrieval(clip, None, pool=muse.pool).eval()  # the host without MUSE, same weights
    return muse, plain


def test_pool_receives_museheads_frames_and_starts_equal_to_clips(ex):
    muse, plain = _models(ex)
    ids, attn, video, mask = ex.random_batch(3, 4, 16, 64, 1000)
    seen = []
    muse.pool.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    with torch.no_grad():
        logits = muse(ids, attn, video, mask)
        ref = plain(ids, attn, video, mask)
        frames = muse.frame_features(video, mask)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    torch.testing.assert_close(seen[0], frames)  # the pooling gets MUSE's per-frame features, (B, T, D)
    assert seen[0].shape == (3, 4, 32)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)  # the head is the identity at start


def test_padded_frames_do_not_matter_and_training_reaches_the_head(ex):
    muse, _ = _models(ex)
    ids, attn, video, mask = ex.random_batch(3, 4, 16, 64, 1000, seed=2)
    mask[0, 2:] = 0
    other = video.clone()
    other[0, 2:] = 100 * torch.randn_like(other[0, 2:])
    with torch.no_grad():
        torch.testing.assert_close(muse(ids, attn, video, mask), muse(ids, attn, other, mask))
    muse.train()
    optimizer = torch.optim.AdamW(muse.param_groups(1e-4))
    for _ in range(2):  # the first step moves the zero-initialised projections, the second reaches the mixers
        loss = ex.symmetric_infonce(muse(ids, attn, other, mask))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    silent = [n for n, p in muse.head.named_parameters() if not (p.grad is not None and p.grad.abs().sum() > 0)]
    assert silent == []
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert all(lrs[id(p)] == pytest.approx(1e-3) for p in muse.head.parameters())


def test_script_runs(ex):
    assert torch.isfinite(torch.tensor(ex.main(["--steps", "2", "--batch_size", "2", "--frames", "3"])))
