"""Benchmark the selective scan: time and peak extra memory, forward and forward+backward.

Compares, at batch=8, dim=512, N=16 (MUSE's mixer width) and L in {256, 1024, 3060, 12360}:

  (a) plain loops, autograd through them (the baseline):
        plain      one step per token, state (batch, dim, N), per-step exp; no per-step einsum
                   (this is ``muse_pyramid.ops.selective_scan_ref``)
        plain_1t   the same on one thread (its ops are small: threads can cost more than they give)
        plain_pre  the same loop over decays/inputs precomputed for all steps (batch, dim, L, N),
                   stepped with ``unbind`` (indexing would allocate a full gradient per step)
      the ratios use the faster of the two per measurement ("best plain loop");
  (b) every ``muse_pyramid.ops.selective_scan`` backend available on the device; on the CPU the
      ``torch`` backend runs the fused CPU kernel when it builds (``_cpu_kernel.py``), and
      ``torch_portable`` is the same backend with the kernel off (``MUSE_PYRAMID_CPU_KERNEL=0``):
      the op-by-op PyTorch scan that GPUs without mamba-ssm run;
  (c) mamba_ssm's CUDA kernel when importable (``--device cuda``).

The script also counts the ATen ops that one ``torch``-backend forward+backward dispatches (batch 2,
dim 64, N 16, L 3,060, with z, D and delta_softplus, the CPU kernel off; ``--ops_length`` changes L), with a
``TorchDispatchMode``: on a GPU each is a kernel launch. The portable scan is a ``torch.library``
custom op, which hides its inner ops from dispatch modes, so the count runs its autograd.Function
twin (the same ATen ops).

Times are medians of ``--repeats`` runs after ``--warmup`` runs. Peak extra memory is the peak,
over the call, of the bytes held by tensors allocated during the call (inputs excluded; saved
activations, workspaces and gradients included): on the CPU from the allocation events of
``torch.profiler`` (``profile_memory=True``), on CUDA from ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_scan.py            # full table: benchmarks/results/bench_scan.json (+ .md)
    python benchmarks/bench_scan.py --quick    # small sizes, under a minute (what CI runs)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from muse_pyramid.ops import (  # noqa: E402
    SCAN_BACKENDS,
    _chunked_scan,  # noqa: E402
    scan_backend,
    selective_scan,
    selective_scan_ref,
)
from muse_pyramid.ops._cpu_kernel import CPU_KERNEL_ENV, kernel_usable  # noqa: E402

PLAIN = ("plain", "plain_1t", "plain_pre")
MEASURES = ("fwd_s", "fwdbwd_s", "fwd_peak_mib", "fwdbwd_peak_mib")


def plain_precomputed(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Plain loop over precomputed (batch, dim, L, N) decays and inputs (mamba_ssm's reference style)."""
    delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decays = torch.exp(delta[..., None] * A[:, None, :])  # (batch, dim, L, N)
    inputs = (delta * u)[..., None] * rearrange(B, "b n l -> b 1 l n")
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for a_t, x_t, C_t in zip(decays.unbind(2), inputs.unbind(2), C.unbind(-1)):
        h = torch.addcmul(x_t, a_t, h)
        ys.append((h * C_t[:, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1) + u * D[:, None]
    return y * F.silu(z)


class _CountOps(TorchDispatchMode):
    """Counts every ATen op dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_torch_ops(length, device, batch=2, dim=64, n_state=16):
    """ATen ops of one torch-backend selective_scan forward+backward (z, D, delta_bias, softplus on)."""
    inputs = make_inputs(batch, dim, length, n_state, device)
    with mock.patch.object(_chunked_scan, "_run", _chunked_scan._run_function), portable(), _CountOps() as counter:
        selective_scan(**inputs, delta_softplus=True, backend="torch").sum().backward()
    total = sum(counter.counts.values())
    return {"batch": batch, "dim": dim, "N": n_state, "L": length, "aten_ops": total,
            "top": dict(counter.counts.most_common(8))}


def make_inputs(batch, dim, length, n_state, device, seed=0):
    """Mamba-like inputs: softplus(delta + bias) around 0.001..0.1, A = -(1..N) (S4D real)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) - 4.0,
        "A": -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, n_state, length, generator=g),
        "C": torch.randn(batch, n_state, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.rand(dim, generator=g) - 3.0,
    }
    return {k: v.to(device).requires_grad_() for k, v in inputs.items()}


def portable():
    """The torch backend without the fused CPU kernel, for the duration of a ``with`` block."""
    return mock.patch.dict(os.environ, {CPU_KERNEL_ENV: "0"})


def runner(method, inputs, backward):
    """One call: forward (under no_grad) or forward+backward of ``method`` on ``inputs``."""

    def call():
        if method in ("plain", "plain_1t"):
            return selective_scan_ref(**inputs, delta_softplus=True)
        if method == "plain_pre":
            return plain_precomputed(**inputs, delta_softplus=True)
        if method == "torch_portable":
            with portable():
                return selective_scan(**inputs, delta_softplus=True, backend="torch")
        backend = "cuda" if method == "mamba_ssm" else method
        return selective_scan(**inputs, delta_softplus=True, backend=backend)

    def run():
        if backward:
            call().sum().backward()
            for t in inputs.values():
                t.grad = None
        else:
            with torch.no_grad():
                call()

    def run_one_thread():  # small per-step ops: one thread can beat several
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run()
        finally:
            torch.set_num_threads(threads)

    return run_one_thread if method == "plain_1t" else run


def peak_extra_bytes(run, device):
    """Peak bytes held by tensors allocated during ``run`` (see the module docstring)."""
    if device.type == "cuda":
        return _common.peak_memory(run, device)["peak_bytes"]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def methods_for(device, length, plain_max, plain_pre_max, n_state):
    methods = ["plain"] if length <= plain_max else []
    methods += ["plain_1t"] if length <= plain_max and torch.get_num_threads() > 1 else []
    methods += ["plain_pre"] if length <= plain_pre_max else []
    for name in SCAN_BACKENDS:
        try:
            scan_backend(device, backend=name)
        except RuntimeError:
            continue
        methods.append("mamba_ssm" if name == "cuda" else name)
    if kernel_usable(device, torch.float32, n_state):
        methods.append("torch_portable")
    return methods


def measure(method, length, args, device):
    inputs = make_inputs(args.batch, args.dim, length, args.state, device)
    row = {"L": length, "method": method}
    for mode, backward in (("fwd", False), ("fwdbwd", True)):
        run = runner(method, inputs, backward)
        row[f"{mode}_peak_mib"] = peak_extra_bytes(run, device) / _common.MIB
        timing = _common.time_runs(
            run, device, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget_s
        )
        row[f"{mode}_s"], row[f"{mode}_min_s"], row[f"{mode}_runs_s"] = (
            timing["median_s"],
            timing["min_s"],
            timing["runs_s"],
        )
    return row


def ratios_to_best_plain(rows):
    """(a)/(b): the best plain loop's time and memory over each backend's, per length and measure."""
    out = []
    for length in sorted({r["L"] for r in rows}):
        plain = [r for r in rows if r["L"] == length and r["method"] in PLAIN]
        if not plain:
            continue
        best = {k: min(r[k] for r in plain) for k in MEASURES}
        for r in rows:
            if r["L"] == length and r["method"] not in PLAIN:
                out.append({"L": length, "method": r["method"]} | {k: best[k] / r[k] for k in MEASURES})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common.add_common_args(parser, "benchmarks/results/bench_scan.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 256 1024 3060 12360")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--dim", type=int, default=None, help="default 512 (64 with --quick)")
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument(
        "--plain_max_length", type=int, default=3060, help="skip the plain loops above this L"
    )
    parser.add_argument(
        "--plain_pre_max_length",
        type=int,
        default=3060,
        help="skip plain_pre (holds (B, D, L, N) tensors) above this L",
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, help="only these (plain, plain_1t, plain_pre, torch, torch_portable, mamba_ssm)"
    )
    parser.add_argument("--ops_length", type=int, default=3060, help="L of the ATen op count")
    args = parser.parse_args()
    _common.configure_torch(args.threads)
    device = torch.device(args.device)
    args.batch = args.batch or (2 if args.quick else 8)
    args.dim = args.dim or (64 if args.quick else 512)
    args.lengths = args.lengths or ([256, 1024] if args.quick else [256, 1024, 3060, 12360])
    if args.quick:
        args.repeats = min(args.repeats, 2)

    machine = _common.machine_info(device) | {"load_average_before": _common.load_average()}
    print(
        f"selective scan, batch={args.batch} dim={args.dim} N={args.state} on {machine['cpu']}, "
        f"{machine['torch_threads']} threads, load {machine['load_average_before']}"
    )
    op_count = count_torch_ops(args.ops_length, device)
    print(f"ATen ops, torch backend fwd+bwd at batch 2, dim 64, N 16, L {args.ops_length}: {op_count['aten_ops']}")
    rows = []
    for length in args.lengths:
        for method in methods_for(device, length, args.plain_max_length, args.plain_pre_max_length, args.state):
            if args.methods and method not in args.methods:
                continue
            rows.append(measure(method, length, args, device))
            r = rows[-1]
            print(
                f"L={length:>6} {method:>10}: fwd {r['fwd_s']:.3f} s, fwd+bwd {r['fwdbwd_s']:.3f} s, "
                f"peak {r['fwd_peak_mib']:.1f} / {r['fwdbwd_peak_mib']:.1f} MiB",
                flush=True,
            )
    ratios = ratios_to_best_plain(rows)
    machine["load_average_after"] = _common.load_average()
    table = _common.markdown_table(
        rows,
        [
            ("L", "L"),
            ("method", "method"),
            ("fwd s", "fwd_s"),
            ("fwd+bwd s", "fwdbwd_s"),
            ("fwd peak MiB", "fwd_peak_mib"),
            ("fwd+bwd peak MiB", "fwdbwd_peak_mib"),
        ],
    )
    if ratios:
        table += "\n\nbest plain loop / method (higher is better)\n\n" + _common.markdown_table(
            ratios,
            [
                ("L", "L"),
                ("method", "method"),
                ("fwd", "fwd_s"),
                ("fwd+bwd", "fwdbwd_s"),
                ("fwd memory", "fwd_peak_mib"),
                ("fwd+bwd memory", "fwdbwd_peak_mib"),
            ],
        )
    print("\n" + table)
    settings = {
        k: getattr(args, k) for k in ("batch", "dim", "state", "lengths", "warmup", "repeats", "budget_s")
    }
    payload = {
        "machine": machine,
        "settings": settings,
        "rows": rows,
        "ratios_best_plain_over_method": ratios,
        "torch_backend_aten_ops": op_count,
    }
    print(f"\nwrote {_common.write_outputs(args.out, payload, table)}")


if __name__ == "__main__":
    main()
