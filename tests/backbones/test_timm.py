"""timm_clip_tokens: shape, CLS row == the model's output, MUSEHead on the output, bad input."""

import pytest
import torch
from backbone_helpers import assert_head_runs, assert_token_map, build, images

from muse_pyramid.backbones import timm_clip_tokens

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.backbones


@torch.no_grad()
def test_vit_b32_map_and_cls():
    # The full ViT-B/32 (num_classes=512 makes the head the CLIP projection), random weights.
    model = build(timm.create_model, "vit_base_patch32_clip_quickgelu_224", pretrained=False, num_classes=512)
    x = images(1, 224)
    tokens = timm_clip_tokens(model, x)
    assert_token_map(tokens, model(x), (1, 50, 512))
    assert_head_runs(tokens)


@torch.no_grad()
def test_vit_b16_shaped_map():
    model = build(timm.create_model, "vit_base_patch16_clip_224", pretrained=False, num_classes=512,
                  embed_dim=64, depth=1, num_heads=1)
    x = images(1, 224, seed=1)
    tokens = timm_clip_tokens(model, x)
    assert_token_map(tokens, model(x), (1, 197, 512))
    assert_head_runs(tokens)


def test_bad_input():
    kwargs = dict(pretrained=False, num_classes=512, embed_dim=64, depth=1, num_heads=1, img_size=64)
    with pytest.raises(TypeError, match="timm VisionTransformer.*got Linear"):
        timm_clip_tokens(torch.nn.Linear(2, 2), torch.zeros(1, 3, 64, 64))
    avg = build(timm.create_model, "vit_base_patch32_clip_224", global_pool="avg", **kwargs)
    with pytest.raises(ValueError, match="global_pool='avg'.*expected global_pool='token'"):
        timm_clip_tokens(avg, torch.zeros(1, 3, 64, 64))
    model = build(timm.create_model, "vit_base_patch32_clip_224", **kwargs)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, H, W\)"):
        timm_clip_tokens(model, torch.zeros(1, 2, 3, 64, 64))
