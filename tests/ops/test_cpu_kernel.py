"""The optional fused CPU kernels of the torch backends (``muse_pyramid/ops/_cpu_kernel.py``).

Scan: values and every gradient against the float64 reference over the kernel's own boundaries
(8-step vectors, 512-step recompute blocks, groups; the optional parts run in
``test_selective_scan.py``, whose every test runs with the kernel on and off), agreement with the
portable path, results independent of the thread count, the registered fake and autograd
(``torch.library.opcheck``), and the fallbacks: turned off, not buildable, not fp32, N other than 16.
Convolution (its other tests: ``test_causal_conv1d.py``, also run with the kernel on and off): the same
for lengths around the vector width and the taps, and where it is not used. Skipped with the reason
where the kernels cannot be built (no C++ compiler or ninja).
"""

import importlib
import logging

import pytest
import torch

from muse_pyramid.ops import _cpu_kernel, causal_conv1d, selective_scan
from muse_pyramid.ops._cpu_kernel import BLOCK, CPU_KERNEL_ENV, KERNEL_STATES
from tests.reference import check_against_reference, make_inputs

N = KERNEL_STATES


@pytest.fixture
def kernel(monkeypatch):
    """The kernel's ops, on (skip when it cannot be built)."""
    monkeypatch.delenv(CPU_KERNEL_ENV, raising=False)
    ops, reason = _cpu_kernel._build()
    if ops is None:
        pytest.skip(f"the fused CPU kernel is unavailable: {reason}")
    return ops


def spy_on(monkeypatch, module: str, name: str) -> list:
    """Replace `module.name` (a kernel entry point) by a wrapper that records the shape of each call's
    first argument; returns that record."""
    seen = []
    real = getattr(_cpu_kernel, name)

    def spy(*args, **kwargs):
        seen.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(importlib.import_module(module), name, spy)
    return seen


def kernel_then_portable(run, calls: list, monkeypatch) -> tuple:
    """`run()` with the kernel on (it must run once), then with it off (it must not run again)."""
    fused = run()
    assert len(calls) == 1
    monkeypatch.setenv(CPU_KERNEL_ENV, "0")
    portable = run()
    assert len(calls) == 1, "MUSE_PYRAMID_CPU_KERNEL=0 must keep the kernel off"
    return fused, portable


def at_threads(threads: int, run):
    """`run()` on `threads` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the fused scan."""
    return spy_on(monkeypatch, "muse_pyramid.ops.selective_scan", "fused_selective_scan")


@pytest.fixture
def conv_calls(monkeypatch):
    """Counts the calls of the fused convolution."""
    return spy_on(monkeypatch, "muse_pyramid.ops.causal_conv1d", "fused_causal_conv1d")


@pytest.mark.parametrize("length", [1, 7, 8, 37, BLOCK, BLOCK + 3, 2 * BLOCK + 100])
def test_lengths_across_vectors_and_blocks(kernel, calls, length, tolerances):
    check_against_reference(make_inputs(2, 4, length, N, groups=2), True, None, tolerances)
    assert calls, "the fused kernel did not run"


@pytest.mark.parametrize("grad_names", [("u",), ("A", "B"), ("D", "delta_bias"), ("z", "C", "delta"), ()])
def test_gradients_of_any_subset(kernel, grad_names, tolerances):
    check_against_reference(make_inputs(2, 6, 40, N, groups=3), True, None, tolerances, grad_names=grad_names)


def test_matches_the_portable_path(kernel, calls, monkeypatch):
    inputs = make_inputs(2, 32, 1500, N, seed=5)

    def run():
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True)
        (out.square().sum() + last.sum()).backward()
        return [out, last] + [v.grad for v in leaves.values()]

    for a, b in zip(*kernel_then_portable(run, calls, monkeypatch)):
        scale = b.abs().max().item() or 1.0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_results_do_not_depend_on_the_thread_count(kernel):
    inputs = make_inputs(2, 24, 700, N, seed=7)

    def run():
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out = selective_scan(**leaves, delta_softplus=True)
        out.square().sum().backward()
        return [out] + [v.grad for v in leaves.values()]

    for a, b in zip(at_threads(1, run), at_threads(3, run)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_schema_fake_and_autograd(kernel):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and AOT dispatch."""
    inputs = make_inputs(2, 4, 20, N, groups=2)
    Bt, Ct = (inputs[k].transpose(-1, -2).contiguous().requires_grad_() for k in ("B", "C"))
    args = (
        *(inputs[k].requires_grad_() for k in ("u", "delta", "A")), Bt, Ct,
        *(inputs[k].requires_grad_() for k in ("D", "z", "delta_bias")), True, 8,
    )
    torch.library.opcheck(kernel.scan_fwd.default, args)


@pytest.mark.parametrize("shape", [(0, 4, 9), (2, 4, 0)])
def test_empty_batch_or_sequence(kernel, calls, shape):
    """No video or no step: empty outputs and gradients, no error."""
    inputs = {k: v.requires_grad_() for k, v in make_inputs(*shape, N).items()}
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert out.shape == shape and last.shape == (shape[0], shape[1], N)
    (out.sum() + last.sum()).backward()
    assert all(v.grad is not None and v.grad.shape == v.shape for v in inputs.values())
    assert calls


def test_not_used_for_other_state_sizes_or_dtypes(kernel, calls, tolerances):
    check_against_reference(make_inputs(1, 4, 30, 8), True, None, tolerances)
    check_against_reference(make_inputs(1, 4, 30, N, dtype=torch.float64), True, None, tolerances, dtype=torch.float64)
    assert not calls


def test_unavailable_kernel_falls_back_with_one_info_log(monkeypatch, calls, caplog, tolerances):
    monkeypatch.delenv(CPU_KERNEL_ENV, raising=False)
    monkeypatch.setattr(_cpu_kernel, "_build", lambda: (None, "no C++ compiler was found"))
    _cpu_kernel._log_unavailable.cache_clear()
    with caplog.at_level(logging.INFO, logger="muse_pyramid.ops"):
        for _ in range(2):
            check_against_reference(make_inputs(1, 4, 30, N), True, None, tolerances)
    assert not calls
    messages = [r.getMessage() for r in caplog.records if "no C++ compiler" in r.getMessage()]
    assert len(messages) == 1 and "op-by-op PyTorch path" in messages[0]


def test_build_failure_is_reported_not_raised(monkeypatch):
    """A failing build (here: ninja missing) is a reason string, never an exception."""
    from torch.utils import cpp_extension

    _cpu_kernel._build.cache_clear()
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    try:
        ops, reason = _cpu_kernel._build()
        assert ops is None and "ninja" in reason
    finally:
        _cpu_kernel._build.cache_clear()


def test_one_openmp_runtime(kernel):
    """The kernel threads with at::parallel_for on PyTorch's own OpenMP runtime: one libgomp is mapped."""
    import os
    from pathlib import Path

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    libraries = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line or "libiomp" in line}
    assert len({os.path.basename(p) for p in libraries}) <= 1, libraries
    assert len(libraries) <= 1, libraries


# --------------------------------------------------------------------------------------------
# the convolution


def conv_inputs(batch, dim, length, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, length, generator=g), torch.randn(dim, width, generator=g), torch.randn(dim, generator=g)


@pytest.mark.parametrize("length", [1, 3, 4, 8, 11, 16, 37])
@pytest.mark.parametrize("width", [1, 4, 6])
def test_conv_matches_the_portable_path(kernel, conv_calls, monkeypatch, length, width):
    inputs = conv_inputs(2, 5, length, width, seed=length)

    def run():
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = causal_conv1d(*leaves, activation="silu")
        out.square().sum().backward()
        return [out] + [t.grad for t in leaves]

    for a, b in zip(*kernel_then_portable(run, conv_calls, monkeypatch)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_conv_results_do_not_depend_on_the_thread_count(kernel):
    inputs = conv_inputs(3, 16, 5000, 4, seed=3)

    def run():
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = causal_conv1d(*leaves, activation="silu")
        out.square().sum().backward()
        return [out] + [t.grad for t in leaves]

    for a, b in zip(at_threads(1, run), at_threads(3, run)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_opcheck_schema_fake_and_autograd(kernel, use_bias):
    x, weight, bias = (t.requires_grad_() for t in conv_inputs(2, 4, 13, 4))
    torch.library.opcheck(kernel.conv_fwd.default, (x, weight, bias if use_bias else None, True))
    torch.library.opcheck(kernel.conv_fwd.default, (x[:, 1:3], weight[1:3].contiguous(), None, False))


@pytest.mark.parametrize("shape", [(0, 4, 9), (2, 4, 0)])
def test_conv_empty_batch_or_sequence(kernel, conv_calls, shape):
    x, weight, bias = (t.requires_grad_() for t in conv_inputs(*shape, 4))
    out = causal_conv1d(x, weight, bias, activation="silu")
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape and weight.grad.abs().sum() == 0 and bias.grad.abs().sum() == 0
    assert conv_calls


def test_conv_not_used_for_other_dtypes(kernel, conv_calls):
    x, weight, bias = conv_inputs(1, 4, 30, 4)
    causal_conv1d(x.double(), weight.double(), bias.double())
    causal_conv1d(x.bfloat16(), weight, bias)
    assert not conv_calls
