"""The tests' one reference selective scan (the recurrence written out step by step in float64), and
the inputs and comparisons the scan tests share.

Independent of the library's own `selective_scan_ref`, so that both library paths are checked against
formulas, not against each other. Shape letters: batch, dim, N (state), L (length), G (groups).
"""

import torch

from muse_pyramid.ops import selective_scan

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


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
        delta = torch.where(delta > 20, delta, torch.log1p(torch.exp(delta)))
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        h = (
            torch.exp(delta[:, :, t, None] * A.double()) * h
            + delta[:, :, t, None] * B_d[..., t] * u[:, :, t, None]
        )
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


def check_against_reference(
    inputs, softplus, backend, tolerances, grad_names=NAMES, last_state_grad=True, dtype=torch.float32,
):
    """Forward values, last state and the gradients of ``grad_names`` against scan_f64."""
    inputs = {k: v for k, v in inputs.items() if v is not None}
    ours = {k: v.clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
    ref = {k: v.double().clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
    out, last = selective_scan(**ours, delta_softplus=softplus, return_last_state=True, backend=backend)
    out_ref, last_ref = scan_f64(**ref, delta_softplus=softplus)
    assert out.dtype == inputs["u"].dtype and out.shape == inputs["u"].shape
    assert last.dtype == torch.promote_types(dtype, torch.float32) and last.shape == last_ref.shape
    rtol, atol = tolerances[dtype]["out"]
    assert_rel_close(out, out_ref, rtol, atol, "out")
    assert_rel_close(last, last_ref, rtol, atol, "last_state")
    if not any(v.requires_grad for v in ours.values()):
        return
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad_last = torch.randn(last.shape, generator=g, dtype=torch.float64) if last_state_grad else None
    outputs, grads = [out], [grad_out.to(out.dtype)]
    if last_state_grad:
        outputs, grads = outputs + [last], grads + [grad_last.to(last.dtype)]
    torch.autograd.backward(outputs, grads)
    torch.autograd.backward(
        [out_ref, last_ref] if last_state_grad else [out_ref], [grad_out, grad_last][: len(outputs)]
    )
    rtol, atol = tolerances[dtype]["grad"]
    for name, t in ours.items():
        if name in grad_names:
            assert t.grad is not None, f"no gradient for {name}"
            assert_rel_close(t.grad, ref[name].grad, rtol, atol, f"grad {name}")
        else:
            assert t.grad is None


def extreme_inputs(batch, dim, length, n_state, softplus):
    """Step sizes log-uniform in [1e-4, 10] (after softplus when it is on), A from -1e-3 to -100."""
    g = torch.Generator().manual_seed(0)
    inputs = make_inputs(batch, dim, length, n_state, seed=2)
    log_delta = torch.empty(batch, dim, length).uniform_(-9.2103, 2.3026, generator=g)
    delta = torch.exp(log_delta)
    # softplus^-1 so that the final step sizes span the same range
    inputs["delta"] = torch.log(torch.expm1(delta)) if softplus else delta
    inputs["delta_bias"] = None
    inputs["A"] = -torch.logspace(-3, 2, n_state).repeat(dim, 1)
    return inputs
