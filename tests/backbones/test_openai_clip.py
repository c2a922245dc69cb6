"""openai_clip_tokens on OpenAI's module layout: shape, CLS row == encode_image, MUSEHead, bad input."""

import pytest
import torch
from backbone_helpers import assert_head_runs, assert_token_map, convert_to_fp16, images, make_openai_clip

from muse_pyramid.backbones import openai_clip_tokens


@torch.no_grad()
@pytest.mark.parametrize("patch, width, layers, n_tokens", [(32, 768, 12, 50), (16, 64, 1, 197)], ids=["B32", "B16"])
def test_map_and_cls(patch, width, layers, n_tokens):
    # OpenAI's layout at 224 px with a 512-wide embedding: the full ViT-B/32 image tower, and a narrow
    # one-block tower with B/16's patch grid (the text tower stays small: only the image side is tested).
    model = make_openai_clip(embed_dim=512, image_resolution=224, vision_width=width, vision_layers=layers,
                             vision_patch_size=patch, transformer_width=64, transformer_layers=1)
    x = images(1, 224, seed=patch)
    tokens = openai_clip_tokens(model.visual, x)
    assert_token_map(tokens, model.encode_image(x), (1, n_tokens, 512))
    # The whole CLIP is accepted too.
    torch.testing.assert_close(openai_clip_tokens(model, x), tokens, rtol=0, atol=0)
    assert_head_runs(tokens)


@torch.no_grad()
def test_fp16_model_as_openai_ships_it():
    model = convert_to_fp16(make_openai_clip())  # weights as in OpenAI's releases; norms compute in fp32
    x = images(2, 64)  # fp32 input is cast to the model's dtype, as encode_image does
    tokens = openai_clip_tokens(model.visual, x)
    assert tokens.dtype == torch.float16
    torch.testing.assert_close(tokens[:, 0], model.encode_image(x), rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(TypeError, match=r"OpenAI-layout CLIP ViT.*Linear lacks \['conv1'"):
        openai_clip_tokens(torch.nn.Linear(2, 2), torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, H, W\)"):
        openai_clip_tokens(make_openai_clip().visual, torch.zeros(64, 64))
