"""causal_conv1d against F.conv1d with explicit left padding, for every CPU backend, with the fused CPU
kernel on and off (its own tests: ``test_cpu_kernel.py``), plus dispatch and errors."""

import functools

import pytest
import torch
import torch.nn.functional as F

from muse_pyramid.ops import causal_conv1d, causal_conv1d_ref, conv_backend

CPU_BACKENDS = ["torch"]
FUNCTIONS = [causal_conv1d_ref] + [functools.partial(causal_conv1d, backend=b) for b in CPU_BACKENDS]
FUNCTION_IDS = ["ref"] + CPU_BACKENDS

pytestmark = pytest.mark.usefixtures("cpu_path")  # every test with the fused CPU kernel on and off


def conv_f64(x, weight, bias, activation):
    """Depthwise conv1d on the input padded with width-1 zeros on the left, in float64."""
    dim, width = weight.shape
    out = F.conv1d(
        F.pad(x.double(), (width - 1, 0)),
        weight.double()[:, None],
        None if bias is None else bias.double(),
        groups=dim,
    )
    return F.silu(out) if activation else out


@pytest.mark.parametrize("fn", FUNCTIONS, ids=FUNCTION_IDS)
@pytest.mark.parametrize(
    "width,length,activation,use_bias",
    [(4, 17, "silu", True), (2, 1, None, False), (5, 3, "swish", True), (1, 6, None, True), (4, 3, "silu", False),
     (3, 40, None, True)],
)
def test_matches_padded_conv(fn, width, length, activation, use_bias, tolerances):
    check_against_padded_conv(fn, width, length, activation, use_bias, tolerances)


def check_against_padded_conv(fn, width, length, activation, use_bias, tolerances):
    """Values and all gradients against conv_f64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, length, generator=g, requires_grad=True)
    weight = torch.randn(6, width, generator=g, requires_grad=True)
    bias = torch.randn(6, generator=g, requires_grad=True) if use_bias else None
    out = fn(x, weight, bias, activation)
    leaves = [t for t in (x, weight, bias) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = conv_f64(ref_leaves[0], ref_leaves[1], ref_leaves[2] if use_bias else None, activation)
    rtol, atol = tolerances[torch.float32]["out"]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    grad_out = torch.randn(out.shape, generator=g)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    rtol, atol = tolerances[torch.float32]["grad"]
    for mine, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channel_slice_read_in_place(backend, tolerances):
    """x a channel slice of a wider tensor (as BiMamba's half of in_proj's output): same values and grads."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 10, 23, generator=g, requires_grad=True)
    weight, bias = torch.randn(4, 4, generator=g), torch.randn(4, generator=g)
    out = causal_conv1d(wide[:, 3:7], weight, bias, "silu", backend=backend)
    ref = conv_f64(wide.detach()[:, 3:7], weight, bias, "silu")
    rtol, atol = tolerances[torch.float32]["out"]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    out.sum().backward()
    assert wide.grad[:, :3].abs().sum() == 0 and wide.grad[:, 7:].abs().sum() == 0
    x64 = wide.detach()[:, 3:7].double().requires_grad_()
    conv_f64(x64, weight, bias, "silu").sum().backward()
    rtol, atol = tolerances[torch.float32]["grad"]
    torch.testing.assert_close(wide.grad[:, 3:7].double(), x64.grad, rtol=rtol, atol=atol)


def test_causality():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 10, generator=g)
    weight = torch.randn(4, 4, generator=g)
    x2 = x.clone()
    x2[..., 6:] += 1.0
    torch.testing.assert_close(causal_conv1d(x, weight)[..., :6], causal_conv1d(x2, weight)[..., :6])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_input_keeps_its_dtype(backend, tolerances):
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 4, 9, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    out = causal_conv1d(x.bfloat16(), weight, bias, "silu", backend=backend)
    assert out.dtype == torch.bfloat16
    rtol, atol = tolerances[torch.bfloat16]["out"]
    torch.testing.assert_close(out.float(), causal_conv1d_ref(x, weight, bias, "silu"), rtol=rtol, atol=atol)


def test_backend_dispatch(monkeypatch):
    monkeypatch.delenv("MUSE_PYRAMID_CONV_BACKEND", raising=False)
    assert conv_backend(torch.zeros(1)) == "torch"
    assert conv_backend(torch.zeros(1, dtype=torch.float64)) == "torch"
    with pytest.raises(ValueError, match="expected one of"):
        conv_backend("cpu", backend="compiled")  # the C kernel of earlier versions is gone
    monkeypatch.setenv("MUSE_PYRAMID_CONV_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4))
    assert causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4), backend="torch").shape == (1, 2, 3)


def test_errors_name_the_argument():
    x = torch.zeros(2, 4, 5)
    with pytest.raises(
        ValueError, match=r"`weight` has shape \(3, 4\), expected \(dim, width\) = \(4, width\)"
    ):
        causal_conv1d(x, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"`bias` has shape \(5,\), expected \(dim,\) = \(4,\)"):
        causal_conv1d(x, torch.zeros(4, 4), torch.zeros(5))
    with pytest.raises(ValueError, match=r"`activation` got 'relu'"):
        causal_conv1d(x, torch.zeros(4, 4), activation="relu")
    with pytest.raises(ValueError, match=r"`x` has shape \(4, 5\)"):
        causal_conv1d(torch.zeros(4, 5), torch.zeros(4, 4))
