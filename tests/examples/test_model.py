"""CLIP4Clip dual encoder (examples/tvr/model.py): heads, padding, logit scale, CLIP building."""

import math

import pytest
import torch
import torch.nn.functional as F
from tvr.model import SIM_HEADERS, SeqTransfHead, build_clip, build_model, build_small_clip

from muse_pyramid import MUSEHead
from muse_pyramid.backbones import open_clip_tokens
from tests.examples._pipeline_utils import TINY_CLIP, random_batch, tiny_clip, tiny_model


@pytest.mark.parametrize("sim_header", SIM_HEADERS)
def test_forward_shapes_and_unit_norm(sim_header):
    model = tiny_model(sim_header).eval()
    batch = random_batch(torch.Generator().manual_seed(0))
    text, video, scale = model(**batch)
    d = TINY_CLIP["embed_dim"]
    assert text.shape == video.shape == (4, d) and scale.ndim == 0
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(video.norm(dim=-1), torch.ones(4))


def test_text_is_projected_eot_feature():
    model = tiny_model("meanP").eval()
    batch = random_batch(torch.Generator().manual_seed(1), words=TINY_CLIP["context_length"])
    want = F.normalize(model.clip.encode_text(batch["text_ids"]), dim=-1)
    torch.testing.assert_close(model.encode_text(batch["text_ids"]), want)


def test_meanp_is_masked_mean_of_clip_image_embeddings():
    model = tiny_model("meanP").eval()
    batch = random_batch(torch.Generator().manual_seed(2))
    video, mask = batch["video"], batch["video_mask"]
    frames = F.normalize(model.clip.encode_image(video.flatten(0, 1)), dim=-1).unflatten(0, video.shape[:2])
    want = F.normalize((frames * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(model.encode_video(video, mask), want, rtol=1e-5, atol=1e-5)


def test_muse_head_reads_projected_tokens():
    model = tiny_model("MUSE").eval()
    batch = random_batch(torch.Generator().manual_seed(3))
    video, mask = batch["video"], batch["video_mask"]
    tokens = open_clip_tokens(model.clip, video.flatten(0, 1)).unflatten(0, video.shape[:2])
    tokens = tokens * mask[..., None, None]
    torch.testing.assert_close(model.encode_frames(video, mask), model.head(tokens, mask), rtol=1e-5, atol=1e-5)
    assert isinstance(model.head, MUSEHead) and model.head.config.dim == TINY_CLIP["embed_dim"]


@pytest.mark.parametrize("sim_header", SIM_HEADERS)
def test_padded_frames_do_not_change_the_embedding(sim_header):
    """A 2-frame video padded to 3 frames embeds exactly as the 2 frames alone (padding never reaches CLIP)."""
    model = tiny_model(sim_header).eval()
    gen = torch.Generator().manual_seed(4)
    video = torch.randn(1, 2, 3, 16, 16, generator=gen)
    padded = torch.cat([video, torch.randn(1, 1, 3, 16, 16, generator=gen)], dim=1)  # garbage in the pad
    mask2, mask3 = torch.ones(1, 2, dtype=torch.long), torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(model.encode_video(padded, mask3), model.encode_video(video, mask2),
                               rtol=1e-5, atol=1e-5)


def test_logit_scale_clamped_to_100():
    model = tiny_model("meanP")
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(500.0))
    model.clamp_logit_scale()
    assert float(model.logit_scale.detach().exp()) == pytest.approx(100.0)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(20.0))
    model.clamp_logit_scale()
    assert float(model.logit_scale.detach().exp()) == pytest.approx(20.0)


def test_all_parameters_get_gradients():
    model = tiny_model("MUSE").train()
    text, video, scale = model(**random_batch(torch.Generator().manual_seed(5)))
    (scale.exp() * (text @ video.t())).logsumexp(0).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_seq_transf_initialised_from_clip_text_blocks():
    assert not SeqTransfHead(TINY_CLIP["embed_dim"], layers=1).init_from_clip(tiny_clip())  # 32 != text width 64
    torch.manual_seed(0)
    clip = build_small_clip(**{**TINY_CLIP, "embed_dim": TINY_CLIP["text_width"]})
    head = SeqTransfHead(TINY_CLIP["text_width"], layers=1, max_frames=8)
    assert head.init_from_clip(clip)
    torch.testing.assert_close(head.transformer.resblocks[0].attn.in_proj_weight,
                               clip.transformer.resblocks[0].attn.in_proj_weight)
    torch.testing.assert_close(head.frame_position_embeddings.weight[:8], clip.positional_embedding[:8])


def test_bad_inputs_raise():
    model = tiny_model("meanP")
    batch = random_batch(torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="video_mask"):
        model.encode_video(batch["video"], batch["video_mask"][:, :2])
    empty = batch["video_mask"].clone()
    empty[0] = 0
    with pytest.raises(ValueError, match="at least one real frame"):
        model.encode_video(batch["video"], empty)
    with pytest.raises(ValueError, match="sim_header"):
        build_model(tiny_clip(), sim_header="tightTransf")
    with pytest.raises(ValueError, match="MUSE dim"):
        build_model(tiny_clip(), sim_header="MUSE", muse={"dim": 7})
    with pytest.raises(ValueError, match="vision_width"):
        build_small_clip(vision_width=48)


def test_pretrained_clip_needs_weights_and_random_init_is_explicit(tmp_path, monkeypatch):
    monkeypatch.delenv("MUSE_PYRAMID_CLIP_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="ViT-B-32.pt"):
        build_clip("ViT-B/32", weights_dir=str(tmp_path))
    with pytest.raises(ValueError, match="random_init_clip"):
        build_clip(str(tmp_path / "custom.pt"), random_init=True)


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("MUSE", dropout=0.0).train()
        model.set_grad_checkpointing(checkpointing)
        text, video, scale = model(**random_batch(torch.Generator().manual_seed(8)))
        (scale.exp() * (text @ video.t())).logsumexp(0).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_amp_needs_cuda():
    from tvr.runtime import autocast_context

    with pytest.raises(ValueError, match="--precision bf16"):
        autocast_context("bf16", torch.device("cpu"))
