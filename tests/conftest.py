"""Shared test settings: tolerances keyed by dtype, and the device tests run on (CPU by default).

Set ``MUSE_PYRAMID_TEST_DEVICE`` (e.g. ``cuda``) to run device-aware tests elsewhere.
"""

import os

import pytest
import torch

# (rtol, atol) per dtype; gradients get the looser second column, as kernel tests usually do.
# atol is scaled by the magnitude of the reference where a test says so.
TOLERANCES = {
    torch.float64: {"out": (1e-10, 1e-10), "grad": (1e-9, 1e-9)},
    torch.float32: {"out": (1e-5, 1e-5), "grad": (1e-5, 1e-5)},
    torch.float16: {"out": (3e-3, 5e-3), "grad": (1e-2, 1e-2)},
    torch.bfloat16: {"out": (3e-2, 5e-2), "grad": (5e-2, 1e-1)},
}


@pytest.fixture
def tolerances():
    """The dtype -> {"out": (rtol, atol), "grad": (rtol, atol)} table."""
    return TOLERANCES


@pytest.fixture
def device():
    """Device for tests that can run anywhere; CPU unless MUSE_PYRAMID_TEST_DEVICE says otherwise."""
    return torch.device(os.environ.get("MUSE_PYRAMID_TEST_DEVICE", "cpu"))
