"""Symmetric InfoNCE (examples/tvr/loss.py) against a hand-written float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from tvr.loss import contrastive_loss, gather_with_grad, symmetric_infonce


def _reference(text: torch.Tensor, video: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Per-row log-softmax written out with explicit sums, text->video and video->text, averaged."""
    t, v = text.double(), video.double()
    s = math.exp(logit_scale) * t @ v.t()
    n = s.shape[0]
    t2v = sum(-(s[i, i] - torch.log(torch.exp(s[i]).sum())) for i in range(n)) / n
    v2t = sum(-(s[i, i] - torch.log(torch.exp(s[:, i]).sum())) for i in range(n)) / n
    return (t2v + v2t) / 2


def _unit(gen: torch.Generator, n: int, d: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)


def test_value_and_gradients_match_reference():
    gen = torch.Generator().manual_seed(0)
    text, video = _unit(gen, 6, 8).requires_grad_(), _unit(gen, 6, 8).requires_grad_()
    scale = torch.tensor(math.log(20.0), dtype=torch.float64, requires_grad=True)
    loss = symmetric_infonce(text, video, scale)
    ref = _reference(text, video, float(scale.detach()))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, (text, video, scale))
    t2, v2, s2 = text.detach().clone().requires_grad_(), video.detach().clone().requires_grad_(), scale.detach().clone()
    s2.requires_grad_()
    s_mat = s2.exp() * t2 @ v2.t()
    target = torch.arange(6)
    ref_loss = (F.cross_entropy(s_mat, target) + F.cross_entropy(s_mat.t(), target)) / 2
    for got, want in zip(grads, torch.autograd.grad(ref_loss, (t2, v2, s2))):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_symmetric_in_text_and_video():
    gen = torch.Generator().manual_seed(1)
    text, video = _unit(gen, 5, 4), _unit(gen, 5, 4)
    scale = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(symmetric_infonce(text, video, scale), symmetric_infonce(video, text, scale))


def test_perfect_matches_give_low_loss_and_shuffles_high():
    eye = torch.eye(4, dtype=torch.float64)
    scale = torch.tensor(math.log(100.0), dtype=torch.float64)
    assert symmetric_infonce(eye, eye, scale) < 1e-6
    assert symmetric_infonce(eye, eye.roll(1, 0), scale) > 50


def test_single_process_gather_is_identity_and_loss_equal():
    gen = torch.Generator().manual_seed(2)
    text, video = _unit(gen, 3, 4), _unit(gen, 3, 4)
    scale = torch.tensor(1.0, dtype=torch.float64)
    assert gather_with_grad(text) is text
    torch.testing.assert_close(contrastive_loss(text, video, scale), symmetric_infonce(text, video, scale))


@pytest.mark.parametrize("shapes", [((3, 4), (2, 4)), ((3,), (3,)), ((3, 4), (3, 5))])
def test_bad_shapes_raise(shapes):
    text, video = torch.zeros(shapes[0]), torch.zeros(shapes[1])
    with pytest.raises(ValueError, match="text and video"):
        symmetric_infonce(text, video, torch.tensor(0.0))
