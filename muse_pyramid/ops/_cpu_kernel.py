"""The compiled CPU kernels: build ``_kernels.c`` on first use, cache it, call it via ctypes.

Three ops share the one library: the selective scan (``compiled_scan``), the depthwise causal
conv1d with SiLU (``compiled_conv``) and dropout (``compiled_dropout``). The source is plain C (no torch headers), so the system
compiler builds it in about a second.
The shared library is cached per user in ``$MUSE_PYRAMID_CACHE_DIR`` (default
``$XDG_CACHE_HOME/muse_pyramid`` or ``~/.cache/muse_pyramid``) under a name keyed by a hash of
the source, the compiler, its flags and the CPU, and written atomically (compile to a temporary
file, then rename), so concurrent processes never load a half-written file. When no compiler
is found, compiling fails or ``MUSE_PYRAMID_NO_COMPILE=1``, the kernel is unavailable and the
scan falls back to the PyTorch path (a warning is logged once per process). ``pip install``
never compiles anything.

Tests: ``tests/ops/test_selective_scan.py``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = [
    "NO_COMPILE_ENV", "CACHE_DIR_ENV", "compiled_disabled", "load_kernel", "compiled_usable", "check_compiled_usable",
    "compiled_scan", "compiled_conv", "compiled_dropout",
]

_logger = logging.getLogger(__name__)

NO_COMPILE_ENV = "MUSE_PYRAMID_NO_COMPILE"
CACHE_DIR_ENV = "MUSE_PYRAMID_CACHE_DIR"
_SOURCE = Path(__file__).with_name("_kernels.c")
# tried in order: the first that compiles wins (OpenMP or -march=native may be unsupported).
# No -ffast-math: with GCC < 13 it links crtfastmath.o into the shared library, which flips the
# whole process to flush-to-zero on load. The kernel brings its own vectorisable exp instead.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
_COMMON_FLAGS = ("-shared", "-fPIC", "-fno-math-errno")
_COMPILE_TIMEOUT_S = 120


def compiled_disabled() -> bool:
    """True when ``MUSE_PYRAMID_NO_COMPILE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(NO_COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "muse_pyramid"


def _cpu_id() -> str:
    """Something that changes when the instruction set may change (-march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compile(compiler: str, flags: tuple, source: bytes, out: Path) -> None:
    """Compile ``source`` into ``out`` atomically (temporary file in the same folder + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "scan.c"
        src.write_bytes(source)
        tmp_out = Path(tmp) / out.name
        subprocess.run(
            [compiler, *flags, *_COMMON_FLAGS, "-o", str(tmp_out), str(src)],
            check=True,
            capture_output=True,
            timeout=_COMPILE_TIMEOUT_S,
        )
        os.replace(tmp_out, out)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.muse_scan_fwd.argtypes = [p] * 8 + [i32] * 2 + [p] * 3 + [i64] * 5 + [i32]
    lib.muse_scan_fwd.restype = None
    lib.muse_scan_bwd.argtypes = [p] * 8 + [i32] * 2 + [p] * 11 + [i64] * 5 + [i32]
    lib.muse_scan_bwd.restype = None
    lib.muse_scan_fwd_work_floats.argtypes = [i64]
    lib.muse_scan_fwd_work_floats.restype = i64
    lib.muse_scan_bwd_work_floats.argtypes = [i64] * 4
    lib.muse_scan_bwd_work_floats.restype = i64
    lib.muse_conv_fwd.argtypes = [p] * 3 + [i32] * 2 + [p] + [i64] * 4 + [i32]
    lib.muse_conv_fwd.restype = None
    lib.muse_conv_bwd.argtypes = [p] * 3 + [i32] * 2 + [p] * 5 + [i64] * 4 + [i32]
    lib.muse_conv_bwd.restype = None
    lib.muse_conv_bwd_work_floats.argtypes = [i64]
    lib.muse_conv_bwd_work_floats.restype = i64
    lib.muse_dropout.argtypes = [p] * 2 + [i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, i32]
    lib.muse_dropout.restype = None
    return lib


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be built here (warns once per process)."""
    try:
        source = _SOURCE.read_bytes()
    except OSError as err:
        _logger.warning("selective_scan: the CPU kernel source is missing (%s); using the PyTorch scan", err)
        return None
    compiler = _compiler()
    if compiler is None:
        _logger.warning(
            "selective_scan: no C compiler found (set CC or install gcc/clang); using the slower PyTorch scan"
        )
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = b""
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), version, " ".join(flags).encode(), _cpu_id().encode()])
        )
        path = _cache_dir() / f"kernels_{key.hexdigest()[:20]}.so"
        try:
            if not path.exists():
                _compile(compiler, flags, source, path)
            return _declare(ctypes.CDLL(str(path)))
        except subprocess.CalledProcessError as err:
            errors.append(f"{' '.join(flags)}: {err.stderr.decode(errors='replace').strip()[-500:]}")
        except (OSError, subprocess.SubprocessError, AttributeError) as err:
            errors.append(f"{' '.join(flags)}: {err}")
    _logger.warning(
        "selective_scan: compiling the CPU kernel with %s failed; using the slower PyTorch scan. Errors: %s",
        compiler,
        " | ".join(errors),
    )
    return None


def compiled_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the automatic choice may take the compiled kernels for tensors of ``device``/``dtype``."""
    usable = device.type == "cpu" and dtype != torch.float64 and not compiled_disabled()
    return usable and load_kernel() is not None


def check_compiled_usable(device: torch.device, dtype: torch.dtype, op: str) -> None:
    """Raise a RuntimeError saying why a forced "compiled" backend of ``op`` cannot run."""
    if device.type != "cpu":
        raise RuntimeError(f"{op} backend 'compiled' runs on the CPU, got tensors on {device}")
    if dtype == torch.float64:
        raise RuntimeError(f"{op} backend 'compiled' computes in fp32; use backend='torch' for float64")
    if compiled_disabled():
        raise RuntimeError(f"{op} backend 'compiled' is disabled by ${NO_COMPILE_ENV}")
    if load_kernel() is None:
        raise RuntimeError(
            f"{op} backend 'compiled' could not be built (no C compiler, or compiling failed: see the "
            "logged warning); install gcc or clang or set $CC, or use backend='torch'"
        )


def _threads(batch: int, dim: int, length: int, n_state: int) -> int:
    """torch's thread count, but one thread per ~2^22 state updates (or conv taps) at most: waking
    threads for a tiny op costs more than the op (and a whole time slice on a busy machine)."""
    return max(1, min(torch.get_num_threads(), (batch * dim * length * n_state) >> 22))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _like(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.empty_like(t)


class _CompiledScan(torch.autograd.Function):
    """The whole scan (bias, softplus, recurrence, skip, gate) on contiguous fp32 CPU tensors.

    With ``reverse`` the rows of u, delta, z run from the last step to the first, while B and C come
    in already flipped along time (and their gradients leave flipped): see ``_kernels.c``.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, reverse):  # noqa: ANN001 - autograd signature
        lib = load_kernel()
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], B.shape[3]
        out = torch.empty_like(u)
        last = u.new_empty(batch, dim, n_state)
        threads = _threads(batch, dim, length, n_state)
        work = u.new_empty(threads * lib.muse_scan_fwd_work_floats(length))
        inputs = map(_ptr, (u, delta, A, B, C, D, z, delta_bias))
        sizes = (batch, dim, length, n_state, groups, threads)
        lib.muse_scan_fwd(*inputs, int(softplus), int(reverse), *map(_ptr, (out, last, work)), *sizes)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.softplus, ctx.reverse = softplus, reverse
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):  # noqa: ANN001 - autograd signature
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], B.shape[3]
        dout = torch.zeros_like(u) if dout is None else dout.to(torch.float32).contiguous()
        dlast = None if dlast is None else dlast.to(torch.float32).contiguous()
        grads = [_like(t) for t in (u, delta, A, B, C, D, z, delta_bias)]
        lib, threads = load_kernel(), _threads(batch, dim, length, n_state)
        work = u.new_empty(threads * lib.muse_scan_bwd_work_floats(length, n_state, groups, dim))
        inputs = map(_ptr, (u, delta, A, B, C, D, z, delta_bias))
        sizes = (batch, dim, length, n_state, groups, threads)
        flags = (int(ctx.softplus), int(ctx.reverse))
        lib.muse_scan_bwd(*inputs, *flags, *map(_ptr, [dout, dlast, *grads, work]), *sizes)
        return (*grads, None, None)


def compiled_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole selective scan on the compiled kernel (CPU tensors; computed in fp32).

    Args:
        u: ``(batch, dim, L)``.
        delta: raw step sizes ``(batch, dim, L)`` (bias and softplus are applied inside).
        A: ``(dim, N)``.
        B: ``(batch, G, L, N)`` (note: time before state).
        C: ``(batch, G, L, N)``.
        D: ``(dim,)`` or None.
        z: ``(batch, dim, L)`` or None.
        delta_bias: ``(dim,)`` or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        reverse: scan from the last step to the first (``out`` stays in the input's time order;
            ``last_state`` is the state after step 0).

    Returns:
        ``out (batch, dim, L)`` and ``last_state (batch, dim, N)``, both fp32.
    """
    args = [
        None if t is None else t.to(torch.float32).contiguous() for t in (u, delta, A, B, C, D, z, delta_bias)
    ]
    if reverse:  # the kernel reverses the (batch, dim, L) rows itself; B and C are small
        args[3], args[4] = args[3].flip(2), args[4].flip(2)
    return _CompiledScan.apply(*args, bool(delta_softplus), bool(reverse))


class _CompiledConv(torch.autograd.Function):
    """Depthwise causal (or, reversed, anti-causal) conv1d with optional SiLU on contiguous fp32 CPU tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):  # noqa: ANN001 - autograd signature
        lib = load_kernel()
        batch, dim, length = x.shape
        width = weight.shape[1]
        out = torch.empty_like(x)
        threads = _threads(batch, dim, length, 2 * width)
        sizes = (batch, dim, length, width, threads)
        lib.muse_conv_fwd(*map(_ptr, (x, weight, bias)), int(silu), int(reverse), _ptr(out), *sizes)
        ctx.save_for_backward(x, weight, bias)
        ctx.silu, ctx.reverse = silu, reverse
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001 - autograd signature
        x, weight, bias = ctx.saved_tensors
        batch, dim, length = x.shape
        width = weight.shape[1]
        dout = dout.to(torch.float32).contiguous()
        dx, dw, dbias = torch.empty_like(x), torch.empty_like(weight), _like(bias)
        lib, threads = load_kernel(), _threads(batch, dim, length, 2 * width)
        work = x.new_empty(threads * lib.muse_conv_bwd_work_floats(length))
        sizes = (batch, dim, length, width, threads)
        flags = (int(ctx.silu), int(ctx.reverse))
        lib.muse_conv_bwd(*map(_ptr, (x, weight, bias)), *flags, *map(_ptr, (dout, dx, dw, dbias, work)), *sizes)
        return dx, dw, dbias, None, None


def compiled_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool, reverse: bool
) -> torch.Tensor:
    """Depthwise causal conv1d on the compiled kernel (CPU tensors; computed in fp32).

    Args:
        x: ``(batch, dim, L)``.
        weight: taps ``(dim, width)``; tap ``width - 1`` multiplies the current step.
        bias: ``(dim,)`` or None.
        silu: apply SiLU to the result.
        reverse: convolve backwards in time (anti-causal), as if x were flipped.

    Returns:
        ``(batch, dim, L)`` fp32.
    """
    args = [None if t is None else t.to(torch.float32).contiguous() for t in (x, weight, bias)]
    return _CompiledConv.apply(*args, bool(silu), bool(reverse))


def _dropout_call(src: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """`src` with the elements the mask of `seed` drops zeroed and the rest scaled by 1 / (1 - p)."""
    out = torch.empty_like(src)
    threshold = min(round(p * 2**32), 2**32 - 1)
    threads = max(1, min(torch.get_num_threads(), src.numel() >> 18))
    load_kernel().muse_dropout(src.data_ptr(), out.data_ptr(), src.numel(), seed, threshold, 1.0 / (1.0 - p), threads)
    return out


class _CompiledDropout(torch.autograd.Function):
    """Dropout whose mask is a function of a seed and the element index, recomputed in the backward."""

    @staticmethod
    def forward(ctx, x, p, seed):  # noqa: ANN001 - autograd signature
        ctx.p, ctx.seed = p, seed
        return _dropout_call(x, seed, p)

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001 - autograd signature
        return _dropout_call(dout.to(torch.float32).contiguous(), ctx.seed, ctx.p), None, None


def compiled_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout on the compiled kernel (CPU; computed in fp32): each element is zeroed with probability
    ``p`` (resolved to 2^-32) and the rest are scaled by ``1 / (1 - p)``.

    The mask comes from a counter-based generator seeded by one draw from torch's default CPU
    generator, so ``torch.manual_seed`` makes it reproducible, and it does not depend on the thread
    count. Nothing is saved for the backward: it recomputes the mask from the seed.

    Args:
        x: any shape.
        p: drop probability in (0, 1).

    Returns:
        fp32 tensor of ``x``'s shape.
    """
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) % 2**64
    return _CompiledDropout.apply(x.to(torch.float32).contiguous(), float(p), seed)
