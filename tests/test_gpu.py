"""GPU tier: BiMamba and MUSEHead on CUDA, fp32 and bf16 autocast, forward and backward, with padding.

The automatic kernels (mamba-ssm's fused path when it is built) are checked against the portable
PyTorch path on the same device, and both against fp32 on the CPU. Skipped without CUDA; run with
``MUSE_PYRAMID_TEST_DEVICE=cuda python -m pytest -m gpu``.
"""

import pytest
import torch

from muse_pyramid import BiMamba, MUSEHead
from muse_pyramid.ops import _dispatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def cuda_device(device):
    """The test device when it is a CUDA one, else the current CUDA device."""
    return device if device.type == "cuda" else torch.device("cuda")


def _portable(model):
    for m in model.modules():
        if isinstance(m, BiMamba):
            m.scan_backend = m.conv_backend = "torch"
    return model


def _build(kind):
    torch.manual_seed(0)
    model = BiMamba(64, d_state=16) if kind == "BiMamba" else MUSEHead(64, depth=2, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.split(".")[-1].startswith(("A_log", "A_b_log", "D")):
                p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "BiMamba":
        x, mask = torch.randn(2, 300, 64, generator=g), torch.ones(2, 300, dtype=torch.bool)
        mask[1, 190:] = False
        return x, mask
    x, mask = torch.randn(2, 4, 1 + 49, 64, generator=g), torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    return x, mask


def _forward_backward(model, x, mask, device, bf16):
    model = model.to(device).train()
    x = x.to(device).requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x, mask.to(device))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    out.float().backward(grad)
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return out.detach().float()[mask.to(device)].cpu(), [g.float().cpu() for g in grads]


def _close(a, b, rel):
    scale = b.abs().max().clamp_min(1e-6)
    assert float((a - b).abs().max() / scale) <= rel


@pytest.mark.parametrize("kind", ["BiMamba", "MUSEHead"])
@pytest.mark.parametrize("bf16", [False, True])
def test_kernels_portable_and_cpu_agree(cuda_device, kind, bf16):
    x, mask = _inputs(kind)
    ref_out, ref_grads = _forward_backward(_build(kind), x, mask, torch.device("cpu"), bf16=False)
    portable_out, portable_grads = _forward_backward(_portable(_build(kind)), x, mask, cuda_device, bf16)
    kernels_out, kernels_grads = _forward_backward(_build(kind), x, mask, cuda_device, bf16)
    rel = 5e-2 if bf16 else 1e-4
    for out, grads in ((portable_out, portable_grads), (kernels_out, kernels_grads)):
        _close(out, ref_out, rel)
        for g, r in zip(grads, ref_grads):
            _close(g, r, 5 * rel)
    _close(kernels_out, portable_out, rel)


def test_fused_path_is_taken_when_mamba_ssm_is_built(cuda_device):
    fused, reason = _dispatch.probe_cuda_kernel(*_dispatch.INNER_KERNEL)
    if fused is None:
        pytest.skip(f"mamba-ssm's fused path is not available: {reason}")
    m = _build("BiMamba").to(cuda_device)
    assert m._fused_inner(torch.zeros(1, 1, 64, device=cuda_device)) is fused
