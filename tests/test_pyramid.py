"""Tests for muse_pyramid.pyramid: level shapes, ops per scale, LN in fp32, registration."""

import pytest
import torch
from torch import nn

from muse_pyramid import FeaturePyramid, LayerNorm2d, PyramidLevel
from muse_pyramid.pyramid import PointwiseConv2d


@pytest.mark.parametrize("grid", [(7, 7), (14, 14), (24, 24), (6, 10), (7, 5)])
def test_level_shapes_every_scale(grid):
    g = torch.Generator().manual_seed(0)
    h, w = grid
    pyr = FeaturePyramid(16, scales=(0.25, 0.5, 1.0, 2.0, 4.0)) if min(grid) >= 4 else FeaturePyramid(16, (0.5, 1, 2))
    x = torch.randn(3, 16, h, w, generator=g)
    outs = pyr(x)
    assert len(outs) == len(pyr.scales)
    for out, scale, size in zip(outs, pyr.scales, pyr.output_sizes(h, w)):
        expect = (int(h * scale), int(w * scale)) if scale >= 1 else (h // int(1 / scale), w // int(1 / scale))
        assert tuple(out.shape) == (3, 16, *expect) == (3, 16, *size)


def test_vit_b32_token_counts():
    pyr = FeaturePyramid(8)
    sizes = pyr.output_sizes(7, 7)
    assert [a * b for a, b in sizes] == [9, 49, 196]  # 254 per frame
    assert sum(a * b for a, b in FeaturePyramid(8).output_sizes(14, 14)) == 1029


def test_branch_ops_follow_vitdet():
    dim = 32
    four = PyramidLevel(dim, 4.0)
    kinds = [type(m) for m in four]
    assert kinds == [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d,
                     PointwiseConv2d, LayerNorm2d, nn.GELU, nn.Conv2d, LayerNorm2d]
    assert four[0].out_channels == dim // 2 and four[3].out_channels == dim // 4 and four[4].in_channels == dim // 4
    two = PyramidLevel(dim, 2.0)
    assert isinstance(two[0], nn.ConvTranspose2d) and two[0].out_channels == dim // 2
    assert isinstance(PyramidLevel(dim, 0.5)[0], nn.MaxPool2d) and PyramidLevel(dim, 0.5)[0].kernel_size == 2
    assert PyramidLevel(dim, 0.25)[0].kernel_size == 4
    one = PyramidLevel(dim, 1.0)
    assert isinstance(one[0], nn.Conv2d) and one[0].kernel_size == (1, 1)
    assert one[3].kernel_size == (3, 3) and one[3].padding == (1, 1)


def test_pointwise_conv_equals_a_1x1_convolution():
    g = torch.Generator().manual_seed(4)
    conv = PointwiseConv2d(6, 10)
    assert conv.weight.shape == (10, 6, 1, 1) and conv.kernel_size == (1, 1)  # nn.Conv2d's parameters
    x = torch.randn(2, 6, 5, 3, generator=g)
    want = torch.nn.functional.conv2d(x, conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), want)
    torch.testing.assert_close(conv(x.contiguous(memory_format=torch.channels_last)), want)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_have_the_parameters_strides(channels_last):
    # DDP copies every gradient into a bucket view with its parameter's strides and warns ("Grad strides do not
    # match bucket view strides") when they differ; a oneDNN / cuDNN 1x1 conv on a channels-last input returns
    # its weight gradient with channels-last strides, which autograd keeps for a (C_out, C_in, 1, 1) weight.
    # On the CPU torch takes the oneDNN path only with more than one thread.
    g = torch.Generator().manual_seed(5)
    pyr = FeaturePyramid(16, scales=(0.5, 1.0, 2.0, 4.0))
    x = torch.randn(3, 16, 7, 7, generator=g)
    if channels_last:  # what the head's token -> map rearrange gives
        x = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sum(level.square().sum() for level in pyr(x)).backward()
    finally:
        torch.set_num_threads(threads)
    bad = [(n, p.stride(), p.grad.stride()) for n, p in pyr.named_parameters() if p.grad.stride() != p.stride()]
    assert not bad


def test_identity_branch_is_the_tail_on_the_input():
    g = torch.Generator().manual_seed(1)
    pyr = FeaturePyramid(8, scales=(1.0,))
    x = torch.randn(2, 8, 5, 5, generator=g)
    tail = pyr.levels[0]
    torch.testing.assert_close(pyr(x)[0], tail(x))


def test_maxpool_branch_floors_odd_grids():
    pyr = FeaturePyramid(8, scales=(0.5,))
    assert pyr(torch.randn(1, 8, 7, 7))[0].shape[-2:] == (3, 3)


def test_layernorm2d_matches_channel_layernorm_and_runs_in_fp32():
    g = torch.Generator().manual_seed(2)
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.normal_(generator=g)
        ln.bias.normal_(generator=g)
    x = torch.randn(2, 6, 3, 4, generator=g)
    ref = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)
    xb = x.to(torch.bfloat16)
    out = ln.to(torch.bfloat16)(xb)
    assert out.dtype == torch.bfloat16
    ref32 = nn.functional.layer_norm(
        xb.float().permute(0, 2, 3, 1), (6,), ln.weight.float(), ln.bias.float()
    ).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.float(), ref32.to(torch.bfloat16).float())


def test_levels_are_registered_and_trainable():
    pyr = FeaturePyramid(8)
    assert isinstance(pyr.levels, nn.ModuleList) and len(pyr.levels) == 3
    x = torch.randn(2, 8, 7, 7)
    sum(o.sum() for o in pyr(x)).backward()
    for name, p in pyr.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(pyr.state_dict()) == {n for n, _ in pyr.named_parameters()}


def test_default_pyramid_parameter_count():
    assert sum(p.numel() for p in FeaturePyramid(512).parameters()) == 8_267_008


@pytest.mark.parametrize(
    "kwargs, call, match",
    [
        ({"dim": 8, "scales": (3.0,)}, None, r"scale must be one of"),
        ({"dim": 8, "scales": ()}, None, r"scales must name"),
        ({"dim": 6, "scales": (2.0,)}, None, r"divisible by 4"),
        ({"dim": 8}, torch.randn(2, 4, 7, 7), r"x must have C = dim = 8"),
        ({"dim": 8}, torch.randn(8, 7, 7), r"\(N, C, H, W\).*got shape \(8, 7, 7\)"),
        ({"dim": 8, "scales": (0.25,)}, torch.randn(1, 8, 3, 3), r"too small for scale 0.25"),
    ],
)
def test_errors(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        pyr = FeaturePyramid(**kwargs)
        pyr(call)
