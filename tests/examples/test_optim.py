"""AdamW groups and the warm-up + cosine schedule (examples/tvr/optim.py)."""

import io
import math

import pytest
import torch
from tvr.optim import (
    ADAM_BETAS,
    ADAM_EPS,
    WarmupCosine,
    build_optimizer,
    build_param_groups,
    build_scheduler,
)

from tests.examples._pipeline_utils import tiny_model


def _group_of(groups, param):
    hits = [g for g in groups if any(p is param for p in g["params"])]
    assert len(hits) == 1, f"parameter in {len(hits)} groups"
    return hits[0]


@pytest.mark.parametrize("sim_header", ["MUSE", "seqTransf", "meanP"])
def test_groups_cover_every_parameter_once_with_their_lr(sim_header):
    model = tiny_model(sim_header)
    groups = build_param_groups(model, lr=1e-4, coef_lr=1e-3, head_lr_mult=10.0, weight_decay=0.2)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    for p in model.clip.parameters():
        assert _group_of(groups, p)["lr"] == pytest.approx(1e-7)
    if model.head is not None:
        for p in model.head.parameters():
            assert _group_of(groups, p)["lr"] == pytest.approx(1e-3)


def test_no_weight_decay_on_biases_norms_ssm_and_logit_scale():
    model = tiny_model("MUSE")
    groups = build_param_groups(model, lr=1e-4, coef_lr=1e-3, head_lr_mult=10.0, weight_decay=0.2)
    named = dict(model.named_parameters())
    no_decay = ["clip.logit_scale", "clip.ln_final.weight", "clip.visual.ln_post.bias",
                "clip.visual.transformer.resblocks.0.attn.in_proj_bias"]
    no_decay += [n for n in named if n.endswith(("A_log", "A_b_log", ".D", ".D_b"))]
    no_decay += [n for n in named if n.startswith("head.") and (n.endswith("bias") or named[n].ndim < 2)]
    assert any(n.endswith("A_log") for n in no_decay) and any(n.endswith(".D") for n in no_decay)
    for name in no_decay:
        assert _group_of(groups, named[name])["weight_decay"] == 0.0, name
    decay = ["clip.visual.conv1.weight", "clip.text_projection", "clip.visual.proj",
             "head.blocks.0.mixer.in_proj.weight"]
    for name in decay:
        assert _group_of(groups, named[name])["weight_decay"] == 0.2, name


def test_fused_adamw_step_equals_the_plain_one():
    model = tiny_model("MUSE")
    opt = build_optimizer(model, lr=1e-3, coef_lr=0.1, head_lr_mult=10.0)
    assert opt.defaults["fused"]  # CPU parameters: the fused kernel
    twin = tiny_model("MUSE")  # same seed, same weights (a deepcopy would drop the no-decay tags)
    plain = torch.optim.AdamW(build_param_groups(twin, lr=1e-3, coef_lr=0.1, head_lr_mult=10.0),
                              lr=1e-3, betas=opt.defaults["betas"], eps=opt.defaults["eps"],
                              weight_decay=opt.defaults["weight_decay"], fused=False)
    g = torch.Generator().manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for m, o in ((model, opt), (twin, plain)):
            for p, grad in zip(m.parameters(), grads):
                p.grad = grad.clone()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_hyper_parameters():
    opt = build_optimizer(tiny_model("meanP"), lr=1e-4, coef_lr=1e-3, head_lr_mult=10.0)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == ADAM_BETAS == (0.9, 0.98) and opt.defaults["eps"] == ADAM_EPS == 1e-6


@pytest.mark.parametrize("arg", ["lr", "coef_lr", "head_lr_mult"])
def test_non_positive_rates_raise(arg):
    kwargs = {"lr": 1e-4, "coef_lr": 1e-3, "head_lr_mult": 10.0, arg: 0.0}
    with pytest.raises(ValueError, match=arg):
        build_param_groups(tiny_model("meanP"), **kwargs)


def test_warmup_then_cosine():
    sched = WarmupCosine(total_steps=100, warmup_proportion=0.1)
    values = [sched(s) for s in range(100)]
    assert values[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(values[:10], values[1:11]))  # linear ramp up to the peak
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # then decreasing
    assert values[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert sched(100) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_scales_every_group_and_round_trips_weights_only():
    model = tiny_model("MUSE")
    opt = build_optimizer(model, lr=1e-4, coef_lr=1e-3, head_lr_mult=10.0)
    sched = build_scheduler(opt, total_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    factor = WarmupCosine(20)(7)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * factor)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_scheduler(build_optimizer(model, lr=1e-4, coef_lr=1e-3, head_lr_mult=10.0), total_steps=20)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 7


@pytest.mark.parametrize("kwargs", [{"total_steps": 0}, {"total_steps": 10, "warmup_proportion": 1.0}])
def test_bad_schedule_raises(kwargs):
    with pytest.raises(ValueError):
        WarmupCosine(**kwargs)
