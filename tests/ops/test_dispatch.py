"""The CUDA kernel probe and the fallback warning, with stand-in modules (no GPU, no mamba-ssm needed).

mamba-ssm's Python wrapper imports even when its compiled extension was never built (recent versions
build it only with MAMBA_KEEP_CUDA_BUILD=TRUE), so "cuda" must be chosen only when the compiled
modules themselves import.
"""

import logging
import sys
import types

import pytest

from muse_pyramid.ops import _dispatch, conv_backend, scan_backend


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """Clear the per-process caches around each test, and any forcing environment variable."""
    monkeypatch.delenv("MUSE_PYRAMID_SCAN_BACKEND", raising=False)
    monkeypatch.delenv("MUSE_PYRAMID_CONV_BACKEND", raising=False)
    _dispatch.probe_cuda_kernel.cache_clear()
    _dispatch.warn_cuda_fallback.cache_clear()
    yield
    _dispatch.probe_cuda_kernel.cache_clear()
    _dispatch.warn_cuda_fallback.cache_clear()


def _stub(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def _install_mamba(monkeypatch, *, scan_ext: bool, conv_ext: bool):
    """Stand-ins for mamba_ssm's wrapper and causal_conv1d; the compiled extensions present or not."""
    def scan_fn(*args, **kwargs):
        return "scan"

    def conv_fn(*args, **kwargs):
        return "conv"

    _stub(monkeypatch, "mamba_ssm")
    _stub(monkeypatch, "mamba_ssm.ops")
    _stub(monkeypatch, "mamba_ssm.ops.selective_scan_interface", selective_scan_fn=scan_fn, mamba_inner_fn=scan_fn)
    _stub(monkeypatch, "causal_conv1d", causal_conv1d_fn=conv_fn)
    for name, present in (("selective_scan_cuda", scan_ext), ("causal_conv1d_cuda", conv_ext)):
        if present:
            _stub(monkeypatch, name)
        else:
            monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError
    return scan_fn, conv_fn


def test_cuda_chosen_when_the_compiled_extensions_import(monkeypatch, caplog):
    scan_fn, conv_fn = _install_mamba(monkeypatch, scan_ext=True, conv_ext=True)
    with caplog.at_level(logging.WARNING, logger="muse_pyramid.ops"):
        assert scan_backend("cuda") == "cuda"
        assert conv_backend("cuda") == "cuda"
    assert not caplog.records
    assert _dispatch.probe_cuda_kernel(*_dispatch.SCAN_KERNEL) == (scan_fn, "")
    assert _dispatch.probe_cuda_kernel(*_dispatch.INNER_KERNEL)[0] is scan_fn
    assert scan_backend("cpu") != "cuda"  # CPU tensors never take it


def test_wrapper_without_its_extension_falls_back_and_warns_once(monkeypatch, caplog):
    _install_mamba(monkeypatch, scan_ext=False, conv_ext=True)
    with caplog.at_level(logging.WARNING, logger="muse_pyramid.ops"):
        assert scan_backend("cuda") == "torch"
        assert scan_backend("cuda") == "torch"
        assert conv_backend("cuda") == "cuda"  # the conv's own extension is there
    records = [r for r in caplog.records if "selective_scan" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "selective_scan_cuda" in message  # the reason
    assert "MAMBA_KEEP_CUDA_BUILD=TRUE pip install mamba-ssm --no-build-isolation" in message
    assert _dispatch.probe_cuda_kernel(*_dispatch.INNER_KERNEL)[0] is None  # the fused path needs both
    with pytest.raises(RuntimeError, match="selective_scan_cuda.*MAMBA_KEEP_CUDA_BUILD"):
        scan_backend("cuda", backend="cuda")


def test_missing_conv_extension(monkeypatch, caplog):
    _install_mamba(monkeypatch, scan_ext=True, conv_ext=False)
    with caplog.at_level(logging.WARNING, logger="muse_pyramid.ops"):
        assert conv_backend("cuda") == "torch"
        assert scan_backend("cuda") == "cuda"
    assert len(caplog.records) == 1 and "causal_conv1d_cuda" in caplog.records[0].getMessage()
    assert _dispatch.probe_cuda_kernel(*_dispatch.INNER_KERNEL)[0] is None


def test_probe_is_cached(monkeypatch):
    _install_mamba(monkeypatch, scan_ext=True, conv_ext=True)
    first = _dispatch.probe_cuda_kernel(*_dispatch.SCAN_KERNEL)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)  # would now fail to import
    assert _dispatch.probe_cuda_kernel(*_dispatch.SCAN_KERNEL) is first


def test_wrapper_that_raises_on_import(monkeypatch):
    """A wheel built for another CUDA raises OSError on import: absent, with the reason."""
    _install_mamba(monkeypatch, scan_ext=True, conv_ext=True)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)
    fn, reason = _dispatch.probe_cuda_kernel(*_dispatch.SCAN_KERNEL)
    assert fn is None and "mamba_ssm.ops.selective_scan_interface" in reason
