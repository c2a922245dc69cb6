"""open_clip_tokens: shape, CLS row == encode_image, MUSEHead on the output, bad input."""

import pytest
import torch
from backbone_helpers import assert_head_runs, assert_token_map, build, images

from muse_pyramid.backbones import open_clip_tokens

open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.backbones


def small_clip(patch: int, width: int = 64, image: int = 224, **vision):
    """An open_clip CLIP with a narrow, one-block image tower and a 512-wide embedding."""
    vision_cfg = open_clip.model.CLIPVisionCfg(layers=1, width=width, patch_size=patch, image_size=image, **vision)
    text_cfg = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=64, heads=1, layers=1)
    return build(open_clip.model.CLIP, 512, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)


@torch.no_grad()
def test_vit_b32_map_and_cls():
    model = build(open_clip.create_model, "ViT-B-32-quickgelu")  # the full-size architecture, random weights
    x = images(1, 224)
    tokens = open_clip_tokens(model, x)
    assert_token_map(tokens, model.encode_image(x), (1, 50, 512))
    # The vision tower alone gives the same map.
    torch.testing.assert_close(open_clip_tokens(model.visual, x), tokens, rtol=0, atol=0)
    assert_head_runs(tokens)


@torch.no_grad()
def test_vit_b16_shaped_map():
    model = small_clip(patch=16)
    x = images(1, 224, seed=1)
    tokens = open_clip_tokens(model, x)
    assert_token_map(tokens, model.encode_image(x), (1, 197, 512))
    assert_head_runs(tokens)


def test_gradient_reaches_backbone():
    model = small_clip(patch=32, image=64)
    open_clip_tokens(model, images(2, 64)).square().mean().backward()
    assert model.visual.conv1.weight.grad is not None and model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.visual.proj.grad is not None


def test_bad_input():
    model = small_clip(patch=32, image=64)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, H, W\).*got shape \(3, 64, 64\)"):
        open_clip_tokens(model, torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"3 channels, got shape \(1, 1, 64, 64\)"):
        open_clip_tokens(model, torch.zeros(1, 1, 64, 64))
    with pytest.raises(TypeError, match="open_clip CLIP ViT or its .visual.*got Linear"):
        open_clip_tokens(torch.nn.Linear(2, 2), torch.zeros(1, 3, 64, 64))
    dropping = small_clip(patch=32, image=64, patch_dropout=0.5).train()
    with pytest.raises(ValueError, match=r"drops patch tokens in training mode \(patch_dropout > 0\)"):
        open_clip_tokens(dropping, torch.zeros(1, 3, 64, 64))
    avg = small_clip(patch=32, image=64, pool_type="avg")
    with pytest.raises(ValueError, match="pool_type='avg'"):
        open_clip_tokens(avg, torch.zeros(1, 3, 64, 64))
