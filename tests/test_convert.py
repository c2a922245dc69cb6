"""Tests for muse_pyramid.convert on a state dict built with the release's exact names and shapes."""

import math

import pytest
import torch

from muse_pyramid import MUSEHead, convert_release_state_dict, load_release_checkpoint


def _release_state_dict(dim, depth, d_state=16, d_conv=4, prefix="module.", seed=0):
    """The keys and shapes the public release saves (Vim v2 Mamba, expand 1), plus some CLIP keys."""
    g = torch.Generator().manual_seed(seed)
    r = math.ceil(dim / 16)
    shapes = {
        "A_log": (dim, d_state), "D": (dim,), "A_b_log": (dim, d_state), "D_b": (dim,),
        "in_proj.weight": (2 * dim, dim), "conv1d.weight": (dim, 1, d_conv), "conv1d.bias": (dim,),
        "x_proj.weight": (r + 2 * d_state, dim), "dt_proj.weight": (dim, r), "dt_proj.bias": (dim,),
        "conv1d_b.weight": (dim, 1, d_conv), "conv1d_b.bias": (dim,), "x_proj_b.weight": (r + 2 * d_state, dim),
        "dt_proj_b.weight": (dim, r), "dt_proj_b.bias": (dim,), "out_proj.weight": (dim, dim),
    }
    sd = {f"{prefix}clip.visual.proj": torch.randn(8, dim, generator=g), f"{prefix}clip.logit_scale": torch.ones(())}
    for i in range(depth):
        for k, s in shapes.items():
            sd[f"{prefix}MS_mamba.{i}.mamba.{k}"] = torch.randn(s, generator=g)
        sd[f"{prefix}MS_mamba.{i}.layer_norm1.weight"] = torch.randn(dim, generator=g)
        sd[f"{prefix}MS_mamba.{i}.layer_norm1.bias"] = torch.randn(dim, generator=g)
        sd[f"{prefix}MS_mamba.{i}.temporal_fc.weight"] = torch.randn(dim, dim, generator=g)
        sd[f"{prefix}MS_mamba.{i}.temporal_fc.bias"] = torch.randn(dim, generator=g)
    return sd


def test_release_checkpoint_loads_every_block_tensor(tmp_path, caplog):
    sd = _release_state_dict(32, depth=2)
    path = tmp_path / "pytorch_model.bin.1"
    torch.save(sd, path)
    head = MUSEHead(32, depth=2)
    pyramid_before = {k: v.clone() for k, v in head.state_dict().items() if k.startswith("pyramid.")}
    report = load_release_checkpoint(head, path)
    state = head.state_dict()
    torch.testing.assert_close(state["blocks.1.mixer.A_b_log"], sd["module.MS_mamba.1.mamba.A_b_log"])
    torch.testing.assert_close(state["blocks.0.mixer.conv1d_b.weight"], sd["module.MS_mamba.0.mamba.conv1d_b.weight"])
    torch.testing.assert_close(state["blocks.0.norm.bias"], sd["module.MS_mamba.0.layer_norm1.bias"])
    torch.testing.assert_close(state["blocks.1.proj.weight"], sd["module.MS_mamba.1.temporal_fc.weight"])
    assert len(report.loaded) == 2 * 20
    assert sorted(report.ignored) == ["clip.logit_scale", "clip.visual.proj"]
    assert not report.pyramid_loaded and "never registered" in str(report)
    assert all(k.startswith("pyramid.") for k in report.missing)
    for k, v in pyramid_before.items():
        torch.testing.assert_close(state[k], v)


def test_pyramid_from_a_second_source():
    head = MUSEHead(32, depth=1)
    donor = MUSEHead(32, depth=1)
    pyr = {k: v for k, v in donor.state_dict().items() if k.startswith("pyramid.")}
    report = load_release_checkpoint(head, _release_state_dict(32, 1, prefix=""), pyramid_source=pyr)
    assert report.pyramid_loaded and report.missing == []
    for k, v in pyr.items():
        torch.testing.assert_close(head.state_dict()[k], v)


def test_converted_head_runs_and_renames():
    converted, ignored = convert_release_state_dict(_release_state_dict(16, 1))
    assert "blocks.0.mixer.dt_proj_b.bias" in converted and "blocks.0.proj.bias" in converted
    head = MUSEHead(16, depth=1)
    load_release_checkpoint(head, _release_state_dict(16, 1))
    assert head(torch.randn(1, 2, 50, 16)).shape == (1, 2, 16)


def test_mismatches_raise():
    with pytest.raises(ValueError, match=r"no MUSE block weights"):
        load_release_checkpoint(MUSEHead(16, depth=1), {"clip.x": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"blocks.0.mixer.A_log. has shape \(32, 16\), head expects \(16, 16\)"):
        load_release_checkpoint(MUSEHead(16, depth=1), _release_state_dict(32, 1))
    with pytest.raises(ValueError, match=r"no counterpart in the head \(depth 1\)"):
        load_release_checkpoint(MUSEHead(16, depth=1), _release_state_dict(16, 2))
    with pytest.raises(ValueError, match=r"lacks block tensors"):
        load_release_checkpoint(MUSEHead(16, depth=2), _release_state_dict(16, 1))
