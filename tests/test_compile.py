"""`torch.compile(head, fullgraph=True)` captures the whole head on the CPU, in eval and in training.

fullgraph=True fails on any graph break: a host sync in the forward (value-dependent checks), a ctypes
kernel, an untraceable import. The portable scan is a `torch.library` custom op whose fake
implementation AOTAutograd runs here. The "aot_eager" backend checks capture and autograd without
inductor's code generation (which takes minutes on a small CPU); the results must match eager mode.
"""

import pytest
import torch

from muse_pyramid import MUSEHead
from muse_pyramid.ops import selective_scan


def _head(d_state=4):
    torch.manual_seed(0)
    head = MUSEHead(16, depth=2, d_state=d_state, num_heads=2, scales=(0.5, 1.0))
    with torch.no_grad():  # the blocks start as the identity: give them work to do
        for block in head.blocks:
            block.proj.weight.normal_(std=0.2)
    return head


@pytest.mark.slow
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("d_state", [4, 16])
def test_head_compiles_fullgraph(training, d_state):
    """d_state 4: the portable scan's custom op; 16: the fused CPU kernel's ops (the portable one
    where the kernel cannot be built)."""
    head = _head(d_state).train(training)
    head.blocks[0].drop.p = 0.0  # compare with eager mode: no random masks
    head.blocks[1].drop.p = 0.0
    tokens = torch.randn(2, 3, 1 + 16, 16)
    frame_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    tokens_c = tokens.clone().requires_grad_(training)
    tokens_e = tokens.clone().requires_grad_(training)
    with torch.set_grad_enabled(training):
        out_c = compiled(tokens_c, frame_mask)
        out_e = head(tokens_e, frame_mask)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    if training:
        grads_e = torch.autograd.grad(out_e.pow(2).sum(), [tokens_e, *head.parameters()], allow_unused=True)
        grads_c = torch.autograd.grad(out_c.pow(2).sum(), [tokens_c, *head.parameters()], allow_unused=True)
        for a, b in zip(grads_c, grads_e):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_scan_custom_op_passes_opcheck():
    """The portable scan's custom op: schema, fake implementation and autograd registration agree."""
    from muse_pyramid.ops import _chunked_scan

    if not hasattr(torch.library, "opcheck") or not hasattr(_chunked_scan, "_scan_op"):
        pytest.skip("torch without torch.library.custom_op / opcheck")
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(2, 4, 9, generator=g), torch.rand(2, 4, 9, generator=g), -torch.rand(4, 3, generator=g),
        torch.randn(2, 2, 3, 9, generator=g), torch.randn(2, 2, 3, 9, generator=g), 2, 3,
    )
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(_chunked_scan._scan_op, args)
    out = selective_scan(*args[:5])
    assert out.shape == (2, 4, 9)
