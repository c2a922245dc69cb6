"""Tests for muse_pyramid.mamba.BiMamba: Vim v2 layout, Mamba init, maths, direction symmetry, masks."""

import math

import pytest
import torch
import torch.nn.functional as F

from muse_pyramid import BiMamba
from muse_pyramid.mamba import plain_linear, project, reversal_index, reverse
from muse_pyramid.ops import causal_conv1d_ref, selective_scan_ref
from tests.reference import scan_f64

SCAN_BACKENDS = ["torch"]


def _ref_direction(m, xz, s):
    """One direction from the formulas: F.conv1d with left padding and a step-by-step float64 scan."""
    x, z = xz.double().chunk(2, dim=1)
    conv = getattr(m, f"conv1d{s}")
    x = F.silu(F.conv1d(F.pad(x, (m.d_conv - 1, 0)), conv.weight.double(), conv.bias.double(), groups=m.d_inner))
    x_dbl = x.transpose(1, 2) @ getattr(m, f"x_proj{s}").weight.double().t()
    dt, b, c = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt_proj = getattr(m, f"dt_proj{s}")
    delta = F.softplus(dt @ dt_proj.weight.double().t() + dt_proj.bias.double()).transpose(1, 2)  # (B, D, L)
    a = -torch.exp((m.A_log if not s else m.A_b_log).double())
    y, _ = scan_f64(x, delta, a, b.transpose(1, 2), c.transpose(1, 2), getattr(m, f"D{s}"), z)
    return y


def _reference(m, u):
    xz = (u.double() @ m.in_proj.weight.double().t()).transpose(1, 2)
    y = _ref_direction(m, xz, "")
    if m.bidirectional:
        y = y + _ref_direction(m, xz.flip(-1), "_b").flip(-1)
    return y.transpose(1, 2) @ m.out_proj.weight.double().t()


def _randomise(m, g):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("A_log", "D", "dt_proj")):
                continue
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_vim_v2_parameter_names_and_shapes():
    m = BiMamba(32, d_state=16, d_conv=4, expand=1)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    r = math.ceil(32 / 16)
    expect = {
        "in_proj.weight": (64, 32), "out_proj.weight": (32, 32),
        "A_log": (32, 16), "D": (32,), "conv1d.weight": (32, 1, 4), "conv1d.bias": (32,),
        "x_proj.weight": (r + 32, 32), "dt_proj.weight": (32, r), "dt_proj.bias": (32,),
    }
    backward = {"A_b_log": (32, 16), "D_b": (32,), "conv1d_b.weight": (32, 1, 4), "conv1d_b.bias": (32,),
                "x_proj_b.weight": (r + 32, 32), "dt_proj_b.weight": (32, r), "dt_proj_b.bias": (32,)}
    assert shapes == {**expect, **backward}
    assert set(BiMamba(32, bidirectional=False).state_dict()) == set(expect)


def test_mamba_initialisation():
    torch.manual_seed(0)
    m = BiMamba(64, d_state=8, expand=2)
    for s in ("", "_b"):
        dt = F.softplus(getattr(m, f"dt_proj{s}").bias)
        assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
        assert dt.min() < 3e-3 and dt.max() > 3e-2  # spread over the log-uniform range
        a_log = m.A_log if not s else m.A_b_log
        torch.testing.assert_close(a_log, torch.log(torch.arange(1.0, 9.0)).repeat(128, 1))
        torch.testing.assert_close(getattr(m, f"D{s}"), torch.ones(128))
        assert a_log._no_weight_decay and getattr(m, f"D{s}")._no_weight_decay
        bound = m.dt_rank**-0.5
        assert getattr(m, f"dt_proj{s}").weight.abs().max() <= bound
    assert m.no_weight_decay() == {"A_log", "D", "A_b_log", "D_b"}


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("expand", [1, 2])
def test_forward_matches_reference(bidirectional, expand):
    g = torch.Generator().manual_seed(3)
    m = BiMamba(16, d_state=4, d_conv=3, expand=expand, bidirectional=bidirectional)
    _randomise(m, g)
    u = torch.randn(2, 11, 16, generator=g)
    torch.testing.assert_close(m(u).double(), _reference(m, u), rtol=1e-4, atol=1e-5)


class _Lora(torch.nn.Linear):
    """A Linear with a low-rank update, as adapter libraries wrap projections."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, x):
        return super().forward(x) + self.up(self.down(x))


@pytest.mark.parametrize("name", ["in_proj", "out_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b"])
def test_wrapped_or_hooked_projections_run_as_modules(name):
    """The fast path reads plain Linear weights directly; a wrapped or hooked projection must still count."""
    g = torch.Generator().manual_seed(5)
    m = BiMamba(16, d_state=4, d_conv=3)
    _randomise(m, g)
    u = torch.randn(2, 9, 16, generator=g)
    plain = m(u)
    setattr(m, name, _Lora(getattr(m, name)))
    with torch.no_grad():  # a zero update leaves the output as it was, through the module path
        getattr(m, name).up.weight.zero_()
    torch.testing.assert_close(m(u), plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        getattr(m, name).up.weight.normal_(std=1.0, generator=g)
    assert (m(u) - plain).abs().max() > 1e-5  # rounding differences are ~1e-7
    m(u).sum().backward()
    assert getattr(m, name).down.weight.grad is not None
    hooked = BiMamba(16, d_state=4, d_conv=3)
    hooked.load_state_dict({k: v for k, v in m.state_dict().items() if "down" not in k and "up" not in k},
                           strict=False)
    base = hooked(u)
    getattr(hooked, name).register_forward_hook(lambda mod, inp, out: out * 2.0)
    assert (hooked(u) - base).abs().max() > 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_project_is_the_linear_on_either_layout(bias):
    """project: the Linear over the channels of a channel-major input (a channel slice included), written
    channel-major or time-major, values and gradients; its bias left out on request."""
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(6, 5, bias=bias)
    wide = torch.randn(2, 9, 7, generator=g, dtype=torch.float64)
    lin = lin.double()
    x = wide[:, 2:8].requires_grad_()  # (B, I, L), a channel slice: read in place
    want = lin(x.transpose(1, 2))  # (B, L, O)
    torch.testing.assert_close(project(lin, x, time_major=True), want)
    out = project(lin, x)
    assert out.shape == (2, 5, 7) and out.is_contiguous()
    torch.testing.assert_close(out, want.transpose(1, 2))
    if bias:
        torch.testing.assert_close(project(lin, x, bias=False), (want - lin.bias).transpose(1, 2))
    grads = torch.autograd.grad(out.square().sum(), [x, lin.weight])
    want_grads = torch.autograd.grad(want.square().sum(), [x, lin.weight])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


def test_project_calls_anything_but_a_plain_linear():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, 5)
    assert plain_linear(lin)
    handle = lin.register_forward_hook(lambda mod, inp, out: out * 2.0)
    assert not plain_linear(lin)
    torch.testing.assert_close(project(lin, x), 2.0 * lin.weight @ x + 2.0 * lin.bias[:, None])
    with pytest.raises(ValueError, match="bias=False needs a plain nn.Linear"):
        project(lin, x, bias=False)
    handle.remove()
    assert plain_linear(lin) and not plain_linear(_Lora(lin))
    for register in (lin.register_full_backward_hook, torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda *args: None)
        assert not plain_linear(lin), register
        handle.remove()
    assert plain_linear(lin)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("wrapped", [False, True])
def test_positions_return_those_rows_of_the_full_output(dtype, bidirectional, wrapped):
    """forward(x, mask, positions) = forward(x, mask) at those rows, values and every gradient."""
    g = torch.Generator().manual_seed(6)
    m = BiMamba(16, d_state=4, bidirectional=bidirectional).to(dtype)
    _randomise(m, g)
    if wrapped:  # the module path of in_proj
        m.in_proj = _Lora(m.in_proj).to(dtype)
    u = torch.randn(3, 21, 16, generator=g, dtype=dtype, requires_grad=True)
    mask = torch.ones(3, 21, dtype=torch.bool)
    mask[1, 15:] = False
    positions = torch.tensor([[0, 20, 7], [14, 0, 3], [5, 5, 1]])
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for mk in (None, mask):
        rows = m(u, mk, positions)
        full = m(u, mk).gather(1, positions[..., None].expand(-1, -1, 16))
        assert rows.shape == (3, 3, 16)
        torch.testing.assert_close(rows, full, **tol)
        grad = torch.randn(rows.shape, generator=g, dtype=dtype)
        params = [u] + [p for p in m.parameters() if p.requires_grad]
        for a, b in zip(torch.autograd.grad(rows, params, grad), torch.autograd.grad(full, params, grad)):
            torch.testing.assert_close(a, b, **tol)


def test_direction_symmetry():
    """Reversing the sequence and swapping the forward/backward parameter sets reverses the output."""
    g = torch.Generator().manual_seed(4)
    m = BiMamba(16, d_state=4)
    _randomise(m, g)
    swapped = BiMamba(16, d_state=4)
    sd = m.state_dict()
    pairs = {"A_log": "A_b_log", "D": "D_b", "conv1d": "conv1d_b", "x_proj": "x_proj_b", "dt_proj": "dt_proj_b"}
    pairs.update({v: k for k, v in pairs.items()})
    swap = {}
    for k, v in sd.items():
        head, dot, rest = k.partition(".")
        swap[pairs.get(head, head) + dot + rest] = v
    swapped.load_state_dict(swap)
    u = torch.randn(2, 9, 16, generator=g)
    torch.testing.assert_close(swapped(u.flip(1)), m(u).flip(1), rtol=1e-5, atol=1e-5)


def test_forward_only_mamba_is_causal():
    g = torch.Generator().manual_seed(5)
    m = BiMamba(8, d_state=4, bidirectional=False)
    u = torch.randn(1, 10, 8, generator=g)
    u2 = u.clone()
    u2[:, 6:] += 1.0
    torch.testing.assert_close(m(u)[:, :6], m(u2)[:, :6])
    assert not torch.allclose(m(u)[:, 6:], m(u2)[:, 6:])


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_masked_tail_is_invisible(backend, bidirectional):
    """A sequence padded to L gives, on its real rows, exactly the output and the input gradient of the
    sequence alone, whatever the padding holds (NaN included); every output stays finite."""
    g = torch.Generator().manual_seed(6)
    m = BiMamba(8, d_state=4, bidirectional=bidirectional, scan_backend=backend, conv_backend=backend)
    _randomise(m, g)
    u = torch.randn(2, 12, 8, generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    out = m(u, mask)
    torch.testing.assert_close(out[1, :7], m(u[1:, :7])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], m(u[:1])[0], rtol=1e-5, atol=1e-6)
    # the padding itself is really removed: changing it changes nothing real
    u2 = u.clone()
    u2[1, 7:] = 100.0
    torch.testing.assert_close(m(u2, mask)[1, :7], out[1, :7])
    u3 = u.clone().requires_grad_()
    with torch.no_grad():
        u3[1, 7:] = float("nan")
    out3 = m(u3, mask)
    assert torch.isfinite(out3).all()
    torch.testing.assert_close(out3[1, :7], out[1, :7])
    out3[1, :7].pow(2).sum().backward()
    alone = u[1:, :7].clone().requires_grad_()
    m(alone)[0].pow(2).sum().backward()
    torch.testing.assert_close(u3.grad[1, :7], alone.grad[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(u3.grad[1, 7:], torch.zeros(5, 8)) and torch.equal(u3.grad[0], torch.zeros(12, 8))


def test_reversal_index_reverses_each_real_prefix():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    index = reversal_index(mask, 3, 5, mask.device)
    assert index.tolist() == [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]
    assert torch.equal(index.gather(1, index), torch.arange(5).expand(3, 5))  # its own inverse
    assert reversal_index(None, 2, 4, mask.device).tolist() == [[3, 2, 1, 0]] * 2


def test_reverse_is_its_own_inverse_and_gradient():
    """reverse() gathers like x.gather, undoes itself, and its gradient (a gather, not zero-fill plus
    scatter_add) equals the generic gather's, also at second order."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    index = reversal_index(mask, 3, 5, mask.device)[:, None].expand(3, 4, 5)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.equal(reverse(x, index, 2), x.gather(2, index))
    assert torch.equal(reverse(reverse(x, index, 2), index, 2), x)
    weight = torch.randn(3, 4, 5, dtype=torch.float64)
    ours = torch.autograd.grad((reverse(x, index, 2) * weight).sum(), x)[0]
    generic = torch.autograd.grad((x.gather(2, index) * weight).sum(), x)[0]
    assert torch.equal(ours, generic)
    assert torch.autograd.gradcheck(lambda t: reverse(t, index, 2).sin(), (x,))
    assert torch.autograd.gradgradcheck(lambda t: reverse(t, index, 2).sin(), (x,))


def test_mask_must_put_real_tokens_first():
    m = BiMamba(8, d_state=4)
    mask = torch.tensor([[1, 1, 0, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"real tokens \(True\) before the padding, rows \[0\]"):
        m(torch.randn(1, 4, 8), mask)


def _inner_standin(xz, conv_w, conv_b, x_proj_w, dt_proj_w, out_proj_w, out_proj_b, A, B=None, C=None, D=None,
                   delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
    """mamba_inner_fn's documented semantics, from this library's reference ops (for the call plumbing)."""
    assert B is None and C is None and B_proj_bias is None and C_proj_bias is None
    assert conv_w.dim() == 3 and xz.shape[1] == 2 * conv_w.shape[0] and A.dtype == torch.float32
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_ref(x, conv_w[:, 0], conv_b, "silu")
    x_dbl = torch.einsum("rd,bdl->brl", x_proj_w, x)
    n = A.shape[1]
    dt, b, c = torch.split(x_dbl, [x_dbl.shape[1] - 2 * n, n, n], dim=1)
    delta = torch.einsum("dr,brl->bdl", dt_proj_w, dt)
    y = selective_scan_ref(x, delta, A, b, c, D, z, delta_bias, delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_w, out_proj_b)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("with_positions", [False, True])
def test_fused_inner_path_matches_the_separate_ops(bidirectional, with_positions):
    """The mamba_inner_fn path (run here with a stand-in that follows its documented signature) gives the
    output and gradients of the separate ops, with padding and positions."""
    g = torch.Generator().manual_seed(8)
    m = BiMamba(16, d_state=4, d_conv=3, bidirectional=bidirectional, scan_backend="torch", conv_backend="torch")
    _randomise(m, g)
    u = torch.randn(2, 10, 16, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    positions = torch.tensor([[0, 5, 3], [9, 1, 2]]) if with_positions else None
    x = torch.where(mask[..., None], u, torch.zeros(()))
    back = reversal_index(mask, 2, 10, u.device) if bidirectional else None
    assert m._fused_inner(u) is None  # CPU tensors never take it
    fused = m._forward_fused(_inner_standin, x, back, positions)
    ref = m(u, mask, positions)
    real = torch.ones_like(ref[..., 0], dtype=torch.bool) if with_positions else mask
    torch.testing.assert_close(fused[real], ref[real], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(fused[real].sum(), list(m.parameters()), allow_unused=True)
    grads_ref = torch.autograd.grad(ref[real].sum(), list(m.parameters()), allow_unused=True)
    for (name, _), a, b in zip(m.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_positions():
    m, u = BiMamba(8, d_state=4), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"positions must have shape \(B, P\) with B = 2, got shape \(3,\)"):
        m(u, positions=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="positions must be an integer tensor, got dtype torch.float32"):
        m(u, positions=torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"positions must index rows in \[0, 5\), got values in \[0, 5\]"):
        m(u, positions=torch.tensor([[0], [5]]))
    with pytest.raises(TypeError, match="positions must be a torch.Tensor of shape \\(B, P\\), got list"):
        m(u, positions=[[0], [1]])


def test_errors():
    with pytest.raises(ValueError, match=r"d_state must be a positive int, got 0"):
        BiMamba(8, d_state=0)
    with pytest.raises(ValueError, match=r"dt_rank must be 'auto' or a positive int"):
        BiMamba(8, dt_rank="big")
    m = BiMamba(8)
    with pytest.raises(ValueError, match=r"\(B, L, C\) with C = 8, got \(1, 4, 6\)"):
        m(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, L\) = \(1, 4\), got \(1, 5\)"):
        m(torch.randn(1, 4, 8), torch.ones(1, 5, dtype=torch.bool))
