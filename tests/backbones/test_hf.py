"""hf_clip_tokens: shape, CLS row == image_embeds / get_image_features, MUSEHead on the output, bad input."""

import pytest
import torch
from backbone_helpers import assert_head_runs, assert_token_map, build, images

from muse_pyramid.backbones import hf_clip_tokens

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.backbones


def vision_config(**kwargs):
    return transformers.CLIPVisionConfig(projection_dim=512, **kwargs)


@torch.no_grad()
def test_vit_b32_map_and_cls():
    # The full ViT-B/32 vision tower (width 768, 12 layers, 12 heads, 512-wide projection), random weights.
    config = vision_config(patch_size=32, image_size=224, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12)
    model = build(transformers.CLIPVisionModelWithProjection, config)
    x = images(1, 224)
    tokens = hf_clip_tokens(model, x)
    assert_token_map(tokens, model(pixel_values=x).image_embeds, (1, 50, 512))
    assert_head_runs(tokens)


@torch.no_grad()
def test_vit_b16_shaped_map_with_clip_model():
    small = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1)
    config = transformers.CLIPConfig(
        vision_config=dict(patch_size=16, image_size=224, **small),
        text_config=dict(vocab_size=64, max_position_embeddings=8, **small),
        projection_dim=512,
    )
    model = build(transformers.CLIPModel, config)
    x = images(1, 224, seed=1)
    tokens = hf_clip_tokens(model, x)
    pooled = model.get_image_features(pixel_values=x)
    pooled = getattr(pooled, "pooler_output", pooled)  # transformers >= 5 returns a model output
    assert_token_map(tokens, pooled, (1, 197, 512))
    assert_head_runs(tokens)


def test_bad_input():
    config = vision_config(patch_size=32, image_size=64, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=1)
    no_projection = build(transformers.CLIPVisionModel, config)
    with pytest.raises(TypeError, match="CLIPVisionModelWithProjection or CLIPModel.*got CLIPVisionModel"):
        hf_clip_tokens(no_projection, torch.zeros(1, 3, 64, 64))
    model = build(transformers.CLIPVisionModelWithProjection, config)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(N, 3, H, W\)"):
        hf_clip_tokens(model, torch.zeros(3, 64, 64))
