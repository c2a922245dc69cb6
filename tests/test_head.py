"""Tests for muse_pyramid.head: shapes, counts, identity at init, exact padding, round trips, errors."""

import copy
import logging
import pickle
import warnings

import pytest
import torch

from muse_pyramid import MUSEConfig, MUSEHead, pool_video

MODES = ["scale_wise", "frame_wise", "spatial_wise"]
MIXERS = ["bimamba", "mamba", "attention"]


def _tokens(b, t, h, w, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 1 + h * w, c, generator=g)


def _perturb_blocks(head, seed=0):
    """Give the zero-initialised projections random values so the blocks do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in head.blocks:
            blk.proj.weight.normal_(std=0.2, generator=g)
            blk.proj.bias.normal_(std=0.2, generator=g)
    return head


@pytest.mark.parametrize("grid, scales", [((7, 7), (0.5, 1.0, 2.0)), ((14, 14), (0.5, 1.0)),
                                          ((24, 24), (0.25, 0.5)), ((4, 6), (0.5, 1.0, 2.0, 4.0))])
def test_output_shapes_for_grids(grid, scales):
    h, w = grid
    head = MUSEHead(16, scales=scales, depth=1, d_state=4, grid=None if h == w else grid)
    out = head(_tokens(2, 2, h, w, 16))
    assert out.shape == (2, 2, 16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("bt", [(1, 1), (1, 3), (2, 1)])
def test_every_mode_mixer_and_tiny_batches(mode, mixer, bt):
    b, t = bt
    head = MUSEHead(16, depth=2, aggregation=mode, mixer=mixer, d_state=4, num_heads=2)
    out = head(_tokens(b, t, 4, 4, 16))
    assert out.shape == (b, t, 16) and torch.isfinite(out).all()


def test_sequence_lengths_of_the_paper():
    head = MUSEHead(16, depth=1)
    assert head.sequence_length(12, (7, 7)) == 3060
    assert head.sequence_length(12, (14, 14)) == 12360
    assert head.sequence_length(64, (7, 7)) == 16320
    assert head.sequence_length(64, (14, 14)) == 65920


def test_default_parameter_count_all_saved_and_trained():
    head = MUSEHead(512)
    n_blocks = sum(p.numel() for p in head.blocks.parameters())
    n_pyr = sum(p.numel() for p in head.pyramid.parameters())
    assert (n_blocks, n_pyr) == (4_687_872, 8_267_008)
    assert sum(p.numel() for p in head.parameters()) == 12_954_880
    params = dict(head.named_parameters())
    assert set(head.state_dict()) == set(params)
    # a tiny grid keeps the sequence short; zero-initialised projections still get gradients,
    # and after one step everything upstream of them does too.
    _perturb_blocks(head)
    x = _tokens(1, 2, 2, 2, 512)
    head(x).square().sum().backward()
    missing = [n for n, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_identity_at_init():
    head = MUSEHead(16, depth=3, d_state=4)
    x = _tokens(2, 4, 7, 7, 16)
    torch.testing.assert_close(head(x), x[:, :, 0], rtol=0, atol=0)


def test_init_survives_construction():
    head = MUSEHead(32, depth=2)
    for blk in head.blocks:
        assert torch.count_nonzero(blk.proj.weight) == 0
        dt = torch.nn.functional.softplus(blk.mixer.dt_proj.bias)
        assert 1e-4 <= dt.min() and dt.max() <= 0.1 + 1e-6
    assert [blk.drop.p for blk in head.blocks] == pytest.approx([0.0, 0.1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_padded_frames_give_the_output_of_the_real_frames_alone(mode, mixer):
    torch.manual_seed(0)
    head = _perturb_blocks(MUSEHead(16, depth=2, aggregation=mode, mixer=mixer, d_state=4, num_heads=2)).eval()
    x = _tokens(3, 5, 4, 4, 16, seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    x[1, 3:] = 0.0  # zero padding, as the data pipeline makes it
    x[2, 1:] = 7.0  # arbitrary padding must not matter either
    out = head(x, mask)
    for i, n in enumerate([5, 3, 1]):
        alone = head(x[i:i + 1, :n])
        torch.testing.assert_close(out[i, :n], alone[0], rtol=1e-5, atol=1e-5)
        # padded rows: the mean of the real rows (finite, non-zero, whatever the padding held)
        torch.testing.assert_close(out[i, n:], out[i, :n].mean(0).expand(5 - n, -1))


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 0.0, 1e4])
def test_padding_content_never_reaches_any_output_row(mixer, fill):
    """NaN, inf, zeros or huge values in padded frames: real rows exact, padded rows finite and non-zero,
    and a host that L2-normalises every row before masking (CLIP4Clip) stays finite."""
    head = _perturb_blocks(MUSEHead(16, depth=2, mixer=mixer, d_state=4, num_heads=2)).eval()
    x = _tokens(2, 4, 4, 4, 16, seed=3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    ref = head(x, mask)
    x[0, 2:] = fill
    out = head(x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all() and (out.norm(dim=-1) > 0).all()
    assert torch.isfinite(out / out.norm(dim=-1, keepdim=True)).all()


def test_tokens_of_another_dtype_are_cast_to_the_heads():
    head = _perturb_blocks(MUSEHead(16, depth=1, d_state=4)).eval()
    x = _tokens(2, 2, 4, 4, 16).half()
    out = head(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head(x.float()))


def _host_init(module):
    """A host's blanket init, as CLIP4Clip's `init_weights`: every Linear N(0, 0.02), biases zeroed."""
    if isinstance(module, torch.nn.Linear):
        module.weight.data.normal_(mean=0.0, std=0.02)
        if module.bias is not None:
            module.bias.data.zero_()


def test_reset_parameters_restores_the_paper_init_after_a_host_init():
    torch.manual_seed(0)
    head = MUSEHead(16, depth=2, d_state=4)
    x = _tokens(2, 3, 4, 4, 16)
    head.apply(_host_init)
    assert len(head.init_overwritten()) == 4  # two blocks, two directions
    assert not torch.allclose(head.eval()(x), x[:, :, 0])
    head.reset_parameters()
    assert head.init_overwritten() == []
    torch.testing.assert_close(head(x), x[:, :, 0])  # the identity again
    for blk in head.blocks:
        assert torch.count_nonzero(blk.proj.weight) == 0
        dt = torch.nn.functional.softplus(blk.mixer.dt_proj_b.bias)
        assert 1e-4 <= dt.min() and dt.max() <= 0.1 + 1e-6
        torch.testing.assert_close(blk.mixer.A_b_log[0].exp(), torch.arange(1.0, 5.0))


def test_warns_once_at_the_first_training_forward_when_the_init_was_overwritten():
    from muse_pyramid.head import InitOverwrittenWarning

    head = MUSEHead(16, depth=1, d_state=4)
    x = _tokens(1, 2, 4, 4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head.train()(x)  # a fresh head: no warning
    head = MUSEHead(16, depth=1, d_state=4).apply(_host_init)
    head.eval()(x)  # inference is not checked
    with pytest.warns(InitOverwrittenWarning, match=r"reset_parameters\(\)"):
        head.train()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head(x)  # once only


def test_batch_independence():
    head = _perturb_blocks(MUSEHead(16, depth=2, d_state=4)).eval()
    x = _tokens(3, 2, 4, 4, 16)
    out = head(x)
    x2 = x.clone()
    x2[1] += 3.0
    out2 = head(x2)
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]])
    assert not torch.allclose(out2[1], out[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_forward_reads_the_cls_rows_of_forward_features(mode, mixer):
    """forward() computes the last block at the CLS rows only: the same values and gradients as reading
    them out of the whole mixed sequence."""
    head = _perturb_blocks(MUSEHead(16, depth=2, d_state=4, num_heads=4, aggregation=mode, mixer=mixer)).eval()
    x = _tokens(2, 3, 4, 4, 16).requires_grad_()
    frame_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for mask in (None, frame_mask):
        out = head(x, mask)
        seq, _, cls_index = head.forward_features(x, mask)
        ref = head.forward_head(seq, cls_index, mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        (g_out,) = torch.autograd.grad(out.square().sum(), x)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_gives_the_same_result():
    head = _perturb_blocks(MUSEHead(16, depth=2, d_state=4)).eval()
    x = _tokens(2, 2, 4, 4, 16).requires_grad_()
    out = head(x)
    (g1,) = torch.autograd.grad(out.square().sum(), x)
    head.set_grad_checkpointing(True)
    out_ckpt = head(x)
    (g2,) = torch.autograd.grad(out_ckpt.square().sum(), x)
    torch.testing.assert_close(out_ckpt, out)
    torch.testing.assert_close(g2, g1)


def test_state_dict_and_config_round_trip():
    head = _perturb_blocks(MUSEHead(16, scales=(1.0, 2.0), depth=2, mixer="mamba", d_state=4, grid=(4, 6))).eval()
    cfg = head.config.to_dict()
    assert cfg["scales"] == [1.0, 2.0] and cfg["grid"] == [4, 6] and cfg["mixer"] == "mamba"
    clone = MUSEHead.from_config(cfg).eval()
    clone.load_state_dict(head.state_dict())
    x = _tokens(1, 3, 4, 6, 16)
    torch.testing.assert_close(clone(x), head(x))
    assert MUSEHead.from_config(MUSEConfig(dim=16, depth=1)).config == MUSEConfig(dim=16, depth=1)
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        MUSEConfig.from_dict({"width": 3})


def test_trainable_pyramid_switch():
    head = MUSEHead(16, depth=1, trainable_pyramid=False)
    assert not any(p.requires_grad for p in head.pyramid.parameters())
    assert any(k.startswith("pyramid.") for k in head.state_dict())
    groups = head.param_groups(1e-3)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not ids & {id(p) for p in head.pyramid.parameters()}


def test_param_groups_and_no_weight_decay():
    head = MUSEHead(16, depth=2, d_state=4)
    nwd = head.no_weight_decay()
    assert {"blocks.0.mixer.A_log", "blocks.1.mixer.A_b_log", "blocks.1.mixer.D_b", "blocks.0.norm.weight", "blocks.0.proj.bias"} <= nwd
    assert "blocks.0.mixer.in_proj.weight" not in nwd and "blocks.0.proj.weight" not in nwd
    decay, no_decay = head.param_groups(lr=1e-3, weight_decay=0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 1e-3
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(head.parameters()))
    # name-based: a deepcopy (EMA, checkpoint averaging) or a pickled module keeps A_log out of decay
    assert copy.deepcopy(head).no_weight_decay() == nwd
    assert pickle.loads(pickle.dumps(head)).no_weight_decay() == nwd


def test_pool_video():
    feats = torch.tensor([[[3.0, 4.0], [0.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    v = pool_video(feats, mask)
    expect = torch.tensor([[0.6, 0.8 + 1.0]]) / 2
    torch.testing.assert_close(v, expect / expect.norm())
    torch.testing.assert_close(pool_video(feats[:, :2]), v)


def test_nan_is_not_hidden():
    head = _perturb_blocks(MUSEHead(16, depth=1, d_state=4)).eval()
    x = _tokens(2, 2, 4, 4, 16)
    x[0, 1, 3] = float("nan")
    out = head(x)
    assert torch.isnan(out[0]).any()
    assert torch.isfinite(out[1]).all()


def test_logs_backend_once(caplog):
    head = MUSEHead(16, depth=1, d_state=4)
    with caplog.at_level(logging.INFO, logger="muse_pyramid.head"):
        head(_tokens(1, 1, 4, 4, 16))
        head(_tokens(1, 1, 4, 4, 16))
    msgs = [r.getMessage() for r in caplog.records if "selective scan backend" in r.getMessage()]
    assert len(msgs) == 1
    assert "fused CPU kernel" not in msgs[0]  # d_state 4: the portable scan


def test_log_names_the_fused_cpu_kernel(caplog, monkeypatch):
    from muse_pyramid.ops import _cpu_kernel

    monkeypatch.delenv(_cpu_kernel.CPU_KERNEL_ENV, raising=False)
    ops, reason = _cpu_kernel._build()
    if ops is None:
        pytest.skip(f"the fused CPU kernel is unavailable: {reason}")
    head = MUSEHead(16, depth=1, d_state=16)
    with caplog.at_level(logging.INFO, logger="muse_pyramid.head"):
        head(_tokens(1, 1, 4, 4, 16))
    assert any("'torch' (fused CPU kernel)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "tokens, mask, match",
    [
        (torch.randn(2, 50, 16), None, r"tokens must have shape \(B, T, 1\+H\*W, C\) \(4 dims\), got shape \(2, 50, 16\)"),
        (torch.randn(1, 2, 50, 8), None, r"C = dim = 16, got \(1, 2, 50, 8\)"),
        (torch.randn(1, 2, 40, 16), None, r"40 tokens per frame, which is not 1\+H\*W for a square grid; pass grid"),
        (torch.randn(1, 2, 17, 16), torch.ones(1, 3), r"frame_mask must have shape \(B, T\) = \(1, 2\), got shape \(1, 3\)"),
        (torch.randn(2, 2, 17, 16), torch.tensor([[1, 1], [0, 0]]), r"no real frame for video\(s\) \[1\]"),
        (torch.randint(0, 3, (1, 2, 17, 16)), None, r"tokens must be a floating-point tensor"),
        (torch.randn(2, 0, 17, 16), None, r"at least one video and one frame .*got shape \(2, 0, 17, 16\)"),
        (torch.randn(0, 2, 17, 16), None, r"at least one video and one frame .*got shape \(0, 2, 17, 16\)"),
    ],
)
def test_bad_input(tokens, mask, match):
    head = MUSEHead(16, depth=1, d_state=4)
    with pytest.raises((ValueError, TypeError), match=match):
        head(tokens, mask)


def test_bad_construction():
    with pytest.raises(ValueError, match=r"aggregation|mode must be one of"):
        MUSEHead(16, aggregation="time_wise")
    with pytest.raises(ValueError, match=r"mixer must be one of"):
        MUSEHead(16, mixer="gru")
    with pytest.raises(ValueError, match=r"scale must be one of"):
        MUSEHead(16, scales=(0.5, 3.0))
    with pytest.raises(ValueError, match=r"depth must be a positive int, got 0"):
        MUSEHead(16, depth=0)
    for grid in [(-2, -8), (0, 4), (4,), (2.0, 8)]:
        with pytest.raises(ValueError, match=r"grid must be None or \(H, W\) with two positive ints"):
            MUSEHead(16, grid=grid)
    with pytest.raises(ValueError, match=r"at least one frame per video \(B, T, C\), got shape \(2, 0, 16\)"):
        pool_video(torch.randn(2, 0, 16))
    assert pool_video(torch.randn(0, 3, 16)).shape == (0, 16)
    with pytest.raises(ValueError, match=r"grid=\(3, 5\) expects 1\+3\*5=16"):
        MUSEHead(16, depth=1, grid=(3, 5))(torch.randn(1, 1, 17, 16))


def test_bf16_autocast_matches_fp32_within_bf16_tolerance():
    head = _perturb_blocks(MUSEHead(32, depth=2, d_state=4)).eval()
    x = _tokens(2, 3, 4, 4, 32)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ref = head(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=1e-1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mixer", ["bimamba", "mamba"])
def test_padding_is_exact_on_the_portable_kernels(mode, mixer):
    """The same exactness on the portable PyTorch scan and conv (what GPUs without mamba-ssm run), with
    NaN in the padded frames."""
    torch.manual_seed(0)
    head = MUSEHead(16, depth=2, aggregation=mode, mixer=mixer, d_state=4, scan_backend="torch", conv_backend="torch")
    head = _perturb_blocks(head).eval()
    x = _tokens(2, 4, 4, 4, 16, seed=2)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    x[1, 2:] = float("nan")
    out = head(x, mask)
    torch.testing.assert_close(out[1, :2], head(x[1:, :2])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], head(x[:1])[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
