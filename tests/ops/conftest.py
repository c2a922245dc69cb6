"""Fixtures of the kernel tests."""

import pytest

from muse_pyramid.ops import _cpu_kernel
from muse_pyramid.ops._cpu_kernel import CPU_KERNEL_ENV


@pytest.fixture(params=["cpu-kernel", "portable"])
def cpu_path(request, monkeypatch):
    """A test twice: the torch backend with its fused CPU kernels (fp32), and without them."""
    if request.param == "portable":
        monkeypatch.setenv(CPU_KERNEL_ENV, "0")
    else:
        monkeypatch.delenv(CPU_KERNEL_ENV, raising=False)
        ops, reason = _cpu_kernel._build()
        if ops is None:
            pytest.skip(f"the fused CPU kernels are unavailable: {reason}")
    return request.param
