"""Tests for muse_pyramid.block: zero-initialised residual, mixers, dropout, attention masking."""

import pytest
import torch

from muse_pyramid import AttentionMixer, BiMamba, ResMambaBlock


@pytest.mark.parametrize("mixer", ["bimamba", "mamba", "attention"])
def test_block_is_identity_at_init(mixer):
    g = torch.Generator().manual_seed(0)
    blk = ResMambaBlock(16, mixer=mixer, d_state=4, num_heads=4)
    assert torch.count_nonzero(blk.proj.weight) == 0 and torch.count_nonzero(blk.proj.bias) == 0
    x = torch.randn(2, 7, 16, generator=g)
    torch.testing.assert_close(blk(x), x, rtol=0, atol=0)


def test_mixer_types():
    assert isinstance(ResMambaBlock(16, mixer="bimamba").mixer, BiMamba)
    assert ResMambaBlock(16, mixer="bimamba").mixer.bidirectional
    assert not ResMambaBlock(16, mixer="mamba").mixer.bidirectional
    assert isinstance(ResMambaBlock(16, mixer="attention", num_heads=2).mixer, AttentionMixer)


def test_block_formula():
    g = torch.Generator().manual_seed(1)
    blk = ResMambaBlock(8, d_state=4).eval()
    with torch.no_grad():
        blk.proj.weight.normal_(generator=g)
    x = torch.randn(1, 5, 8, generator=g)
    expect = x + blk.proj(blk.mixer(blk.norm(x)))
    torch.testing.assert_close(blk(x), expect)


def test_dropout_is_plain_dropout_after_the_mixer():
    blk = ResMambaBlock(8, d_state=4, dropout=0.5)
    assert isinstance(blk.drop, torch.nn.Dropout) and blk.drop.p == 0.5


@pytest.mark.parametrize("mixer", ["bimamba", "mamba", "attention"])
def test_positions_give_those_rows_of_the_block_output(mixer):
    torch.manual_seed(0)
    blk = ResMambaBlock(16, mixer=mixer, d_state=4, num_heads=4).eval()
    torch.nn.init.normal_(blk.proj.weight, std=0.3)
    x = torch.randn(2, 11, 16, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 8:] = False
    positions = torch.tensor([[0, 3, 7], [10, 2, 2]])
    rows = blk(x, mask, positions)
    full = blk(x, mask).gather(1, positions[..., None].expand(-1, -1, 16))
    torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-6)
    (g_rows,) = torch.autograd.grad(rows.sum(), x)
    (g_full,) = torch.autograd.grad(full.sum(), x)
    torch.testing.assert_close(g_rows, g_full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="positions must index rows in"):
        blk(x, mask, positions + 5)


def test_attention_mask_hides_padded_keys():
    g = torch.Generator().manual_seed(2)
    mixer = AttentionMixer(8, num_heads=2)
    x = torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    out = mixer(x, mask)
    torch.testing.assert_close(out[1, :4], mixer(x[1:, :4])[0], rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[1, 4:] = 50.0
    torch.testing.assert_close(mixer(x2, mask)[1, :4], out[1, :4])


def test_errors():
    with pytest.raises(ValueError, match=r"mixer must be one of \['bimamba', 'mamba', 'attention'\], got 'lstm'"):
        ResMambaBlock(8, mixer="lstm")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        ResMambaBlock(8, dropout=1.5)
    with pytest.raises(ValueError, match=r"num_heads must divide dim"):
        AttentionMixer(10, num_heads=4)
