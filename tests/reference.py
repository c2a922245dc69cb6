"""The tests' one reference selective scan: the recurrence written out step by step in float64.

Independent of the library's own `selective_scan_ref`, so that both library paths are checked against
formulas, not against each other. Shape letters: batch, dim, N (state), L (length), G (groups).
"""

import torch


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
