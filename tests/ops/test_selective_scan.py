"""selective_scan against a float64 reference written from the recurrence, for every CPU backend,
with the fused CPU kernel on and off (the kernel's own tests: ``test_cpu_kernel.py``).

Covers values, last state and every gradient (including through last_state), chunk boundaries of
the PyTorch path, numerical safety, autocast, dispatch (argument, environment, fallbacks) and
the error messages.
"""

import importlib

import pytest
import torch

import muse_pyramid.ops._chunked_scan as chunked_module
from muse_pyramid.ops import scan_backend, selective_scan, selective_scan_ref
from muse_pyramid.ops._cpu_kernel import CPU_KERNEL_ENV
from tests.reference import (
    assert_rel_close,
    check_against_reference,
    extreme_inputs,
    make_inputs,
    scan_f64,
)

CPU_BACKENDS = ["torch"]


pytestmark = pytest.mark.usefixtures("cpu_path")  # every test with the fused CPU kernel on and off


# the module, not the function of the same name that muse_pyramid.ops exports
scan_module = importlib.import_module("muse_pyramid.ops.selective_scan")


# --------------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "use_D,use_z,use_bias,softplus,groups",
    [
        (True, True, True, True, 0),
        (False, False, False, False, 0),
        (True, False, True, True, 2),
        (False, True, False, True, 4),
        (True, True, False, False, 1),
    ],
)
def test_matches_f64_reference(backend, use_D, use_z, use_bias, softplus, groups, tolerances):
    """N = 16: the fused CPU kernel where it is on, the portable path otherwise."""
    inputs = make_inputs(2, 8, 37, 16, groups=groups)
    if not softplus:  # plain delta must be positive
        inputs["delta"] = inputs["delta"].abs() + 1e-3
    for name, flag in (("D", use_D), ("z", use_z), ("delta_bias", use_bias)):
        if not flag:
            inputs[name] = None
    check_against_reference(inputs, softplus, backend, tolerances)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_state", [16, 32, 12])
def test_state_sizes(backend, n_state, tolerances):
    """N = 16 (Mamba's and MUSE's) runs the fused CPU kernel where it is on (L = 37: whole 8-step
    vectors and a tail); other N run the portable path."""
    check_against_reference(make_inputs(2, 6, 37, n_state), True, backend, tolerances)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("return_last_state", [False, True])
def test_return_last_state_and_optional_last_grad(backend, return_last_state, tolerances):
    inputs = make_inputs(1, 4, 12, 16)
    result = selective_scan(
        **inputs, delta_softplus=True, return_last_state=return_last_state, backend=backend
    )
    if return_last_state:
        out, last = result
        assert last.shape == (1, 4, 16)
    else:
        assert isinstance(result, torch.Tensor) and result.shape == (1, 4, 12)
    # gradient through out only (last_state unused) must match too
    check_against_reference(inputs, True, backend, tolerances, last_state_grad=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grad_names", [("u",), ("A", "B"), ("D", "delta_bias"), ("z", "C", "delta"), ()])
def test_requires_grad_on_any_subset(backend, grad_names, tolerances):
    check_against_reference(
        make_inputs(2, 6, 9, 8, groups=3), True, backend, tolerances, grad_names=grad_names
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch,length", [(1, 1), (1, 2), (3, 1)])
def test_tiny_shapes(backend, batch, length, tolerances):
    check_against_reference(make_inputs(batch, 4, length, 4), True, backend, tolerances)


@pytest.mark.parametrize(
    "plan,length", [((3, 2), 20), ((3, 2), 18), ((4, 4), 5), ((16, 1), 1), ((1, 1), 4), ((1, 5), 13), ((4, 3), 37)]
)
def test_torch_block_boundaries(monkeypatch, plan, length, tolerances):
    """(steps per chunk, chunks per block): L not a multiple of a block, L shorter than one chunk,
    L = 1, one-step chunks, one-chunk blocks."""
    monkeypatch.setattr(chunked_module, "block_plan", lambda *_: plan)
    check_against_reference(make_inputs(2, 4, length, 4, groups=2), True, "torch", tolerances)


@pytest.mark.parametrize("length,row", [(1, 1), (3060, 2048), (3060, 65536), (65920, 16), (10, 2**30)])
def test_block_plan_bounds_the_workspace(length, row):
    chunk, per_block = chunked_module.block_plan(length, row)
    steps = chunk * per_block
    blocks = -(-length // steps)
    assert chunk >= 1 and per_block >= 1 and blocks * steps >= length
    assert blocks * steps - length < blocks * chunk + per_block  # padding below one chunk per block
    assert steps * row <= max(chunked_module.BLOCK_ELEMENTS, row) * 1.1  # the element budget holds


def test_torch_op_count_grows_with_the_block_count(monkeypatch):
    """The scan's ops grow with the number of chunks and blocks, not with L: one forward+backward
    at L = 3,060 dispatches few ATen ops (one per token before)."""
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    inputs = {k: v.requires_grad_() for k, v in make_inputs(2, 64, 3060, 16).items()}
    monkeypatch.setenv(CPU_KERNEL_ENV, "0")  # the portable path: the fused CPU kernel is one op
    with mock.patch.object(chunked_module, "_run", chunked_module._run_function), Count():
        selective_scan(**inputs, delta_softplus=True, backend="torch").sum().backward()
    assert 100 < Count.n <= 1500


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_state", [4, 16])
def test_non_contiguous_inputs(backend, n_state):
    g = torch.Generator().manual_seed(0)
    inputs = make_inputs(2, 6, 11, n_state)
    strided = {
        "u": torch.randn(2, 11, 6, generator=g).transpose(1, 2),
        "delta": torch.rand(2, 6, 22, generator=g)[..., ::2],
        "B": torch.randn(2, 11, n_state, generator=g).transpose(1, 2),
        "C": torch.randn(n_state, 2, 11, generator=g).transpose(0, 1),
        "A": -torch.rand(n_state, 6, generator=g).t(),
    }
    inputs.update(strided)
    assert not any(t.is_contiguous() for t in strided.values())
    contiguous = {k: v.contiguous() for k, v in inputs.items()}
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
    out_c, last_c = selective_scan(**contiguous, delta_softplus=True, return_last_state=True, backend=backend)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    torch.testing.assert_close(last, last_c, rtol=0, atol=0)


def test_reference_matches_f64(tolerances):
    inputs = make_inputs(1, 4, 9, 3, groups=2)
    out, last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    out_ref, last_ref = scan_f64(**inputs, delta_softplus=True)
    rtol, atol = tolerances[torch.float32]["out"]
    assert_rel_close(out, out_ref, rtol, atol, "out")
    assert_rel_close(last, last_ref, rtol, atol, "last_state")


def test_float64_inputs(tolerances):
    inputs = make_inputs(2, 4, 10, 4, dtype=torch.float64)
    assert scan_backend(inputs["u"]) == "torch"
    check_against_reference(inputs, True, None, tolerances, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# numerical safety and precision


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("n_state", [8, 16])
def test_extreme_steps_and_decays_stay_finite(backend, softplus, n_state, tolerances):
    """delta in [1e-4, 10] (log-uniform), A down to -100, a few thousand steps."""
    inputs = extreme_inputs(1, 4, 3000, n_state, softplus)
    ours = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out, last = selective_scan(**ours, delta_softplus=softplus, return_last_state=True, backend=backend)
    (out.sum() + last.sum()).backward()
    for name, t in [("out", out), ("last", last)] + [(f"grad {k}", v.grad) for k, v in ours.items()]:
        assert torch.isfinite(t).all(), f"{name} has NaN/Inf"
    out_ref, last_ref = scan_f64(
        **{k: v for k, v in inputs.items() if v is not None}, delta_softplus=softplus
    )
    rtol, atol = tolerances[torch.float32]["out"]
    assert_rel_close(out, out_ref, rtol, atol, "out")
    assert_rel_close(last, last_ref, rtol, atol, "last_state")


def test_longest_sequence_stays_finite(tolerances):
    """L = 65,920 (64 frames of ViT-B/16): values, last state and every gradient finite."""
    inputs = extreme_inputs(1, 2, 65920, 16, softplus=True)
    for backend in CPU_BACKENDS:
        ours = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
        out, last = selective_scan(**ours, delta_softplus=True, return_last_state=True, backend=backend)
        (out.sum() + last.sum()).backward()
        assert all(torch.isfinite(v.grad).all() for v in ours.values())
        assert torch.isfinite(out).all() and torch.isfinite(last).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_state", [8, 16])
def test_bf16_autocast_keeps_fp32_state(backend, n_state, tolerances):
    """bf16 inputs under autocast: bf16 output, but the state is fp32 (checked at fp32 precision)."""
    inputs = make_inputs(2, 4, 500, n_state)
    low = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, last = selective_scan(**low, delta_softplus=True, return_last_state=True, backend=backend)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    out_ref, last_ref = scan_f64(**low, delta_softplus=True)
    assert_rel_close(last, last_ref, *tolerances[torch.float32]["out"], "last_state")
    assert_rel_close(out, out_ref, *tolerances[torch.bfloat16]["out"], "out")


# --------------------------------------------------------------------------------------------
# dispatch


def test_auto_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("MUSE_PYRAMID_SCAN_BACKEND", raising=False)
    assert scan_backend(torch.device("cpu")) == CPU_BACKENDS[-1]
    assert scan_backend(torch.zeros(1), backend="torch") == "torch"
    assert scan_backend("cpu", backend="auto") == CPU_BACKENDS[-1]


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("MUSE_PYRAMID_SCAN_BACKEND", "torch")
    assert scan_backend("cpu") == "torch"
    assert scan_backend("cpu", backend=CPU_BACKENDS[-1]) == CPU_BACKENDS[-1]  # the argument wins
    monkeypatch.setenv("MUSE_PYRAMID_SCAN_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            selective_scan(**make_inputs(1, 2, 3, 2))
    monkeypatch.setenv("MUSE_PYRAMID_SCAN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="MUSE_PYRAMID_SCAN_BACKEND.*nonsense"):
        scan_backend("cpu")


def test_forced_cuda_without_kernel_names_the_extra(monkeypatch):
    monkeypatch.setattr(scan_module, "probe_cuda_kernel", lambda *_: (None, "mamba_ssm is missing"))
    with pytest.raises(RuntimeError, match=r"because mamba_ssm is missing.*pip install muse-pyramid\[cuda\]"):
        scan_backend("cpu", backend="cuda")


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
def test_torch_backend_on_cuda(tolerances):
    inputs = make_inputs(2, 8, 100, 16, groups=2)
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    out = selective_scan(**cuda_inputs, delta_softplus=True, backend="torch")
    out_ref, _ = scan_f64(**inputs, delta_softplus=True)
    assert_rel_close(out.cpu(), out_ref, *tolerances[torch.float32]["out"], "out")


@requires_cuda
def test_cuda_kernel_matches_torch_backend():
    pytest.importorskip("mamba_ssm")
    inputs = {k: v.cuda() for k, v in make_inputs(2, 8, 100, 16).items()}
    out = selective_scan(**inputs, delta_softplus=True, backend="cuda")
    ref = selective_scan(**inputs, delta_softplus=True, backend="torch")
    torch.testing.assert_close(out, ref, rtol=6e-4, atol=2e-3)


# --------------------------------------------------------------------------------------------
# errors


def test_shape_errors_name_the_argument():
    inputs = make_inputs(2, 8, 5, 4)
    with pytest.raises(
        ValueError, match=r"`B` has shape \(2, 3, 5\), expected \(batch, N, L\) = \(2, 4, 5\)"
    ):
        selective_scan(**{**inputs, "B": torch.zeros(2, 3, 5)})
    with pytest.raises(ValueError, match=r"`A` has shape \(7, 4\), expected \(dim, N\) = \(8, N\)"):
        selective_scan(**{**inputs, "A": torch.zeros(7, 4)})
    with pytest.raises(ValueError, match=r"`C` has shape \(2, 3, 4, 5\).*divisible by G"):
        selective_scan(**{**inputs, "C": torch.zeros(2, 3, 4, 5)})
    with pytest.raises(ValueError, match=r"`u` has shape \(2, 8\), expected \(batch, dim, L\)"):
        selective_scan(**{**inputs, "u": torch.zeros(2, 8)})
    with pytest.raises(
        ValueError, match=r"`z` has shape \(2, 8, 4\), expected \(batch, dim, L\) = \(2, 8, 5\)"
    ):
        selective_scan(**{**inputs, "z": torch.zeros(2, 8, 4)})
    with pytest.raises(ValueError, match=r"`D` has shape \(4,\), expected \(dim,\) = \(8,\)"):
        selective_scan(**{**inputs, "D": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"backend.*'gpu'"):
        selective_scan(**inputs, backend="gpu")


def test_type_errors_name_the_argument():
    inputs = make_inputs(1, 2, 3, 2)
    with pytest.raises(TypeError, match=r"`A` must be real"):
        selective_scan(**{**inputs, "A": torch.zeros(2, 2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match=r"`D` must be a torch.Tensor, got list"):
        selective_scan(**{**inputs, "D": [1.0, 2.0]})
    with pytest.raises(TypeError, match=r"`u` must be a floating tensor"):
        selective_scan(**{**inputs, "u": torch.zeros(1, 2, 3, dtype=torch.long)})
