"""tokens_to_channels / channels_linear / channels_to_tokens against F.linear with transposes: values, every gradient,
the blocked CPU path and the plain one, and argument errors."""

import pytest
import torch
import torch.nn.functional as F

from muse_pyramid.ops import channel_linear
from muse_pyramid.ops.channel_linear import channels_linear, channels_to_tokens, tokens_to_channels

# one block, several blocks with a ragged last one, a single step
LENGTHS = [5, 2 * channel_linear._COLUMN_BLOCK + 37, 1]


def reference_tokens_to_channels(x, weight, bias):
    return F.linear(x, weight, bias).transpose(1, 2)


def reference_channels_linear(x, weight, bias):
    return F.linear(x.transpose(1, 2), weight, bias).transpose(1, 2)


def reference_channels_to_tokens(y, weight, bias):
    return F.linear(y.transpose(1, 2), weight, bias)


CASES = [
    (tokens_to_channels, reference_tokens_to_channels, lambda b, length, k: (b, length, k)),
    (channels_linear, reference_channels_linear, lambda b, length, k: (b, k, length)),
    (channels_to_tokens, reference_channels_to_tokens, lambda b, length, k: (b, k, length)),
]
CASE_IDS = ["tokens_to_channels", "channels_linear", "channels_to_tokens"]


def make_inputs(shape_of, batch, length, k, m, use_bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(shape_of(batch, length, k), generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(m, k, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(m, generator=g, dtype=dtype, requires_grad=True) if use_bias else None
    return inp, weight, bias


@pytest.fixture(params=["blocked", "plain"])
def path(request, monkeypatch):
    """Run a test on the blocked CPU path and on the plain batched-matmul path (the one CUDA takes)."""
    if request.param == "plain":
        monkeypatch.setattr(channel_linear, "_cpu_path", lambda *tensors: False)
    return request.param


@pytest.mark.parametrize("fn,ref,shape_of", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("use_bias", [False, True])
def test_values_and_gradients_match_linear(fn, ref, shape_of, length, use_bias, path):
    inp, weight, bias = make_inputs(shape_of, 3, length, 6, 10, use_bias, torch.float64)
    out = fn(inp, weight, bias)
    expected = ref(inp, weight, bias)
    assert out.shape == expected.shape
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(expected)
    leaves = [t for t in (inp, weight, bias) if t is not None]
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(expected, leaves, grad_out)
    for name, a, b in zip(("input", "weight", "bias"), got, want):
        torch.testing.assert_close(a, b, msg=f"gradient of {name}")


@pytest.mark.parametrize("fn,ref,shape_of", CASES, ids=CASE_IDS)
def test_float32_and_non_contiguous_input(fn, ref, shape_of):
    """A transposed-view input gives the same result; float32 stays within float32 rounding."""
    inp, weight, bias = make_inputs(shape_of, 2, 300, 16, 24, True, torch.float32)
    view = inp.detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert not view.is_contiguous()
    torch.testing.assert_close(fn(view, weight, bias), ref(inp, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn,ref,shape_of", CASES, ids=CASE_IDS)
def test_frozen_weight_gets_no_gradient(fn, ref, shape_of):
    inp, weight, _ = make_inputs(shape_of, 2, 7, 4, 5, False, torch.float64)
    weight.requires_grad_(False)
    fn(inp, weight).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(inp.grad, torch.autograd.grad(ref(inp, weight, None).sum(), inp)[0])


@pytest.mark.parametrize("fn,ref,shape_of", CASES, ids=CASE_IDS)
def test_cpu_path_on_cpu_and_plain_path_under_autocast(fn, ref, shape_of):
    inp, weight, bias = make_inputs(shape_of, 2, 9, 8, 4, True, torch.float32)
    out = fn(inp, weight, bias)
    assert type(out.grad_fn).__name__ == "_BatchedLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(inp, weight, bias)
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__.startswith(("Bmm", "Baddbmm"))
    torch.testing.assert_close(out.float(), ref(inp, weight, bias), rtol=2e-2, atol=5e-2)


def test_channel_major_products_run_in_blocks(monkeypatch):
    calls = []
    original = channel_linear._mm_channel_major
    monkeypatch.setattr(channel_linear, "_mm_channel_major", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(2, 9, 8, requires_grad=True)
    tokens_to_channels(x, torch.randn(4, 8)).sum().backward()  # the forward's product
    assert len(calls) == 2
    channels_to_tokens(x.detach().transpose(1, 2).requires_grad_(), torch.randn(4, 8)).sum().backward()
    assert len(calls) == 4  # the backward's product with respect to the input


def test_channels_linear_reads_a_split_along_channels_in_place(path):
    """A slice along dim 1 (how Mamba splits dt off x_proj's output) has dense rows: used as it lies."""
    full = torch.randn(3, 10, 40, dtype=torch.float64, requires_grad=True)
    part = full[:, 2:6]
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    out = channels_linear(part, weight)
    torch.testing.assert_close(out, reference_channels_linear(part, weight, None))
    out.square().sum().backward()
    want = torch.autograd.grad(reference_channels_linear(part, weight, None).square().sum(), full)[0]
    torch.testing.assert_close(full.grad, want)


def test_errors_name_the_argument():
    x, w = torch.randn(2, 5, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"`x` must have shape \(B, L, K\), got \(5, 4\)"):
        tokens_to_channels(x[0], w)
    with pytest.raises(ValueError, match=r"`weight` must have shape \(M, K\) with K = 4, got \(3, 5\)"):
        tokens_to_channels(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"`weight` must have shape \(M, K\) with K = 5"):
        channels_to_tokens(x, w)
    with pytest.raises(ValueError, match=r"`bias` must have shape \(M,\) = \(3,\), got \(4,\)"):
        channels_to_tokens(x.transpose(1, 2), w, torch.randn(4))
    with pytest.raises(TypeError, match="`weight` must be a torch.Tensor, got list"):
        tokens_to_channels(x, [[1.0]])
