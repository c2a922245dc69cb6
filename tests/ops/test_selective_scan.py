"""selective_scan against a float64 reference written from the recurrence, plus dispatch and errors."""

import pytest
import torch

from muse_pyramid.ops import scan_backend, selective_scan, selective_scan_ref

CPU_BACKENDS = ["torch", "compiled"]


def scan_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ; y_t = C_t . h_t + D u_t ; y *= silu(z), in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    B = B[:, None] if B.dim() == 3 else B
    C = C[:, None] if C.dim() == 3 else C
    group_of = torch.arange(dim) // (dim // B.shape[1])
    B_d, C_d = B[:, group_of], C[:, group_of]  # (batch, dim, N, L)
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B_d[..., t] * u[:, :, t, None]
        ys.append((h * C_d[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        z = z.double()
        y = y * z * torch.sigmoid(z)
    return y, h


def make_inputs(batch, dim, length, n_state, groups=0, seed=0, dtype=torch.float32):
    """Random inputs at Mamba-like scales; groups=0 means B/C of shape (batch, N, L)."""
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, n_state, length) if groups == 0 else (batch, groups, n_state, length)
    return {
        "u": torch.randn(batch, dim, length, generator=g, dtype=dtype),
        "delta": 0.5 * torch.rand(batch, dim, length, generator=g, dtype=dtype) - 0.2,
        "A": -torch.exp(torch.randn(dim, n_state, generator=g, dtype=dtype)),
        "B": torch.randn(*bc_shape, generator=g, dtype=dtype),
        "C": torch.randn(*bc_shape, generator=g, dtype=dtype),
        "D": torch.randn(dim, generator=g, dtype=dtype),
        "z": torch.randn(batch, dim, length, generator=g, dtype=dtype),
        "delta_bias": 0.1 * torch.randn(dim, generator=g, dtype=dtype),
    }


def assert_rel_close(actual, expected, rtol, atol, name=""):
    """assert_close with atol relative to the reference's largest magnitude."""
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}"
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "use_D,use_z,use_bias,softplus,groups",
    [
        (True, True, True, True, 0),
        (False, False, False, False, 0),
        (True, False, True, True, 2),
        (False, True, False, True, 4),
    ],
)
def test_matches_f64_reference(backend, use_D, use_z, use_bias, softplus, groups, tolerances):
    inputs = make_inputs(2, 8, 37, 4, groups=groups)
    if not softplus:  # plain delta must be positive
        inputs["delta"] = inputs["delta"].abs() + 1e-3
    for name, flag in (("D", use_D), ("z", use_z), ("delta_bias", use_bias)):
        if not flag:
            inputs[name] = None
    ours = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    ref = {k: v.double().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out, last = selective_scan(**ours, delta_softplus=softplus, return_last_state=True, backend=backend)
    out_ref, last_ref = scan_f64(**ref, delta_softplus=softplus)
    rtol, atol = tolerances[torch.float32]["out"]
    assert out.dtype == torch.float32 and last.shape == (2, 8, 4)
    assert_rel_close(out, out_ref, rtol, atol, "out")
    assert_rel_close(last, last_ref, rtol, atol, "last_state")
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g)
    out.backward(grad_out)
    out_ref.backward(grad_out.double())
    rtol, atol = tolerances[torch.float32]["grad"]
    for name in ours:
        assert_rel_close(ours[name].grad, ref[name].grad, rtol, atol, f"grad {name}")


def test_reference_matches_f64():
    inputs = make_inputs(1, 4, 9, 3, groups=2)
    out = selective_scan_ref(**inputs, delta_softplus=True)
    torch.testing.assert_close(out.double(), scan_f64(**inputs, delta_softplus=True)[0], rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu():
    assert scan_backend(torch.device("cpu")) in CPU_BACKENDS
    assert scan_backend(torch.zeros(1), backend="torch") == "torch"


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("MUSE_PYRAMID_SCAN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        selective_scan(**make_inputs(1, 2, 3, 2))
    monkeypatch.setenv("MUSE_PYRAMID_SCAN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="MUSE_PYRAMID_SCAN_BACKEND.*nonsense"):
        scan_backend("cpu")


def test_shape_errors_name_the_argument():
    inputs = make_inputs(2, 8, 5, 4)
    with pytest.raises(
        ValueError, match=r"`B` has shape \(2, 3, 5\), expected \(batch, N, L\) = \(2, 4, 5\)"
    ):
        selective_scan(**{**inputs, "B": torch.zeros(2, 3, 5)})
    with pytest.raises(ValueError, match=r"`A` has shape \(7, 4\)"):
        selective_scan(**{**inputs, "A": torch.zeros(7, 4)})
    with pytest.raises(ValueError, match=r"`C`.*divisible by G"):
        selective_scan(**{**inputs, "C": torch.zeros(2, 3, 4, 5)})
    with pytest.raises(ValueError, match=r"`u` has shape \(2, 8\), expected \(batch, dim, L\)"):
        selective_scan(**{**inputs, "u": torch.zeros(2, 8)})
    with pytest.raises(ValueError, match=r"backend.*'gpu'"):
        selective_scan(**inputs, backend="gpu")
