"""One GPU check, under 5 minutes on one GPU: parities, head cost, training-step cost -> JSON.

1. **Parity**: `BiMamba` and `MUSEHead`, fp32 and bf16 autocast, forward and backward, with padded
   videos (masks): the automatic kernels on the device (mamba-ssm's fused path when it is built)
   against the portable PyTorch path (`scan_backend="torch"`, `conv_backend="torch"`) on the same
   device, and both against fp32 on the CPU. Errors are max |a - b| / max |b| over the real outputs,
   the input gradient and every parameter gradient (the worst one is named).
2. **Head cost**: forward+backward time and peak extra memory of the bimamba head (mamba-ssm path and
   portable path) and of the attention head of equal depth (SDPA), at 3,060 (ViT-B/32, 12 frames),
   12,360 (ViT-B/16, 12 frames) and 16,320 (ViT-B/32, 64 frames) mixer tokens.
3. **Training step**: one CLIP4Clip step (ViT-B/32, 12 frames) with meanP against MUSE, built by
   `bench_step.build_step`.

    python benchmarks/gpu_check.py                         # on cuda: benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --small    # dry run: tiny sizes, any machine

Timing is the median of `--repeats` runs after a warm-up; peak memory as in `_common.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import bench_step  # noqa: E402

from muse_pyramid import BiMamba, MUSEHead  # noqa: E402
from muse_pyramid.ops import _dispatch  # noqa: E402

# (label, patch grid side, frames): mixer tokens 3,060 / 12,360 / 16,320 with the default scales
HEAD_POINTS = (("ViT-B/32 x12", 7, 12), ("ViT-B/16 x12", 14, 12), ("ViT-B/32 x64", 7, 64))
SMALL_HEAD_POINTS = (("tiny x2", 2, 2), ("tiny x3", 3, 3))


# ------------------------------------------------------------------------------------------ parity


def _portable(model: torch.nn.Module) -> torch.nn.Module:
    """Force every Mamba mixer of `model` onto the portable PyTorch kernels."""
    for m in model.modules():
        if isinstance(m, BiMamba):
            m.scan_backend, m.conv_backend = "torch", "torch"
    return model


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Perturb every weight (zero-initialised residual projections included) so outputs carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.split(".")[-1].startswith(("A_log", "A_b_log", "D")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _run(model, inputs, mask_args, device, bf16) -> Dict[str, torch.Tensor]:
    """Forward+backward of `model` on `device`: the output, the input gradient and parameter gradients,
    as float32 CPU tensors."""
    model = model.to(device).train()
    x = inputs.to(device).requires_grad_()
    args = [a.to(device) for a in mask_args]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x, *args)
    g = torch.Generator().manual_seed(1)
    out.float().backward(torch.randn(out.shape, generator=g).to(device))
    result = {"out": out.detach().float().cpu(), "grad input": x.grad.float().cpu()}
    for name, p in model.named_parameters():
        if p.grad is not None:
            result[f"grad {name}"] = p.grad.float().cpu()
            p.grad = None
    return result


def _errors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], real: Optional[torch.Tensor]) -> Dict[str, Any]:
    """Worst max|a-b|/max|b| over the output (real rows only), the input gradient and each parameter's."""
    worst, worst_name, out_err = 0.0, "", 0.0
    for key, ref in b.items():
        mine = a[key]
        if key == "out" and real is not None:
            mine, ref = mine[real], ref[real]
        err = float((mine - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if key == "out":
            out_err = err
        if err > worst:
            worst, worst_name = err, key
    return {"out": out_err, "worst": worst, "worst_tensor": worst_name}


def _parity_cases(small: bool) -> List[Tuple[str, Callable[[], torch.nn.Module], torch.Tensor, list, Any]]:
    """(name, model builder, input, extra args, real-row mask) for BiMamba and MUSEHead, padded."""
    g = torch.Generator().manual_seed(0)
    dim, length = (16, 24) if small else (128, 600)
    x = torch.randn(2, length, dim, generator=g)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, length * 2 // 3:] = False
    frames, grid = (3, 2) if small else (6, 7)
    tokens = torch.randn(2, frames, 1 + grid * grid, dim, generator=g)
    frame_mask = torch.ones(2, frames, dtype=torch.bool)
    frame_mask[1, -1] = False
    return [
        ("BiMamba", lambda: BiMamba(dim, d_state=16), x, [mask], mask),
        ("MUSEHead", lambda: MUSEHead(dim, depth=2, dropout=0.0), tokens, [frame_mask], frame_mask),
    ]


def parity(device: torch.device, small: bool) -> List[Dict[str, Any]]:
    rows = []
    cpu = torch.device("cpu")
    for name, build, x, args, real in _parity_cases(small):
        torch.manual_seed(0)
        base = build()
        _randomise(base, 2)
        state = base.state_dict()

        def fresh(portable: bool, state=state, build=build) -> torch.nn.Module:
            model = build()
            model.load_state_dict(state)
            return _portable(model) if portable else model

        reference = _run(fresh(False), x, args, cpu, bf16=False)
        for bf16 in (False, True):
            kernels = _run(fresh(False), x, args, device, bf16)
            portable = _run(fresh(True), x, args, device, bf16)
            rows.append({
                "module": name, "dtype": "bf16 autocast" if bf16 else "fp32",
                "kernels_vs_portable": _errors(kernels, portable, real),
                "kernels_vs_cpu_fp32": _errors(kernels, reference, real),
                "portable_vs_cpu_fp32": _errors(portable, reference, real),
            })
    return rows


# --------------------------------------------------------------------------------------- head cost


def head_cost(device: torch.device, points, batch: int, amp: bool, warmup: int, repeats: int) -> List[Dict[str, Any]]:
    rows = []
    for label, grid, frames in points:
        g = torch.Generator().manual_seed(0)
        for variant in ("bimamba kernels", "bimamba portable", "attention (SDPA)"):
            mixer = "attention" if variant.startswith("attention") else "bimamba"
            head = MUSEHead(512, mixer=mixer, grid=(grid, grid)).to(device).train()
            if variant == "bimamba portable":
                _portable(head)
            tokens = torch.randn(batch, frames, 1 + grid * grid, 512, generator=g).to(device).requires_grad_()
            row = {"point": label, "head": variant, "batch": batch, "frames": frames, "grid": grid,
                   "seq_len": head.sequence_length(frames, (grid, grid))}

            def step(head=head, tokens=tokens) -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = head(tokens)
                out.float().square().mean().backward()
                head.zero_grad(set_to_none=True)
                tokens.grad = None

            try:
                step()
                mem = _common.peak_memory(step, device)
                timing = _common.time_runs(step, device, warmup=warmup, repeats=repeats, budget_s=20.0)
                row.update(fwdbwd_s=timing["median_s"], peak_mib=mem["peak_bytes"] / _common.MIB,
                           memory_method=mem["method"])
            except RuntimeError as exc:  # out of memory at the longest point, say
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            del head, tokens
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"  {label:>13} {variant:>17}: {_common.fmt(row.get('fwdbwd_s'))} s, "
                  f"{_common.fmt(row.get('peak_mib'))} MiB", flush=True)
    return rows


# ----------------------------------------------------------------------------------- training step


def step_cost(device: torch.device, small: bool, amp: bool, warmup: int, repeats: int) -> List[Dict[str, Any]]:
    rows = []
    for head in bench_step.HEADS:
        cfg = {
            "device": str(device), "seed": 0, "head": head, "from_cache": False, "amp": amp,
            "model": bench_step.TINY_CLIP if small else "ViT-B-32-quickgelu",
            "batch": 2 if small else 4, "frames": 2 if small else 12, "words": 32, "dim": 512, "grid": 7,
        }
        row = {"head": head, "model": cfg["model"], "batch": cfg["batch"], "frames": cfg["frames"]}
        try:
            step, facts = bench_step.build_step(cfg)
            step()
            mem = _common.peak_memory(step, device)
            timing = _common.time_runs(step, device, warmup=warmup, repeats=repeats, budget_s=20.0)
            row.update(seq_len=facts["seq_len"], step_s=timing["median_s"],
                       peak_mib=mem["peak_bytes"] / _common.MIB)
        except Exception as exc:  # noqa: BLE001 - record and go on (open_clip missing, OOM...)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(f"  step {head:>5}: {_common.fmt(row.get('step_s'))} s, {_common.fmt(row.get('peak_mib'))} MiB", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes (a dry run of every part)")
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    parser.add_argument("--batch", type=int, default=None, help="videos per head call (default 4; 1 with --small)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_amp", action="store_true", help="time in fp32 instead of bf16 autocast")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    amp = not args.no_amp and device.type == "cuda"
    batch = args.batch or (1 if args.small else 4)
    start = time.perf_counter()
    fused, reason = _dispatch.probe_cuda_kernel(*_dispatch.INNER_KERNEL)
    machine = _common.machine_info(device) | {"load_average_before": _common.load_average()}
    payload: Dict[str, Any] = {
        "machine": machine,
        "settings": {"small": args.small, "batch": batch, "amp_bf16": amp, "repeats": args.repeats},
        "mamba_ssm_fused_path": fused is not None and device.type == "cuda",
        "mamba_ssm_missing_reason": reason,
    }
    sections = (
        ("parity", lambda: parity(device, args.small)),
        ("head", lambda: head_cost(device, SMALL_HEAD_POINTS if args.small else HEAD_POINTS, batch, amp,
                                   args.warmup, args.repeats)),
        ("step", lambda: step_cost(device, args.small, amp, args.warmup, args.repeats)),
    )
    for key, fn in sections:
        print(f"{key} ...", flush=True)
        try:
            payload[key] = fn()
        except Exception:  # noqa: BLE001 - one failing part must not lose the others
            payload[key] = {"error": traceback.format_exc()[-2000:]}
    payload["wall_s"] = time.perf_counter() - start
    machine["load_average_after"] = _common.load_average()
    table = _common.markdown_table(
        [{"module": r["module"], "dtype": r["dtype"],
          **{k: r[k]["worst"] for k in ("kernels_vs_portable", "kernels_vs_cpu_fp32", "portable_vs_cpu_fp32")}}
         for r in payload["parity"]] if isinstance(payload["parity"], list) else [],
        [("module", "module"), ("dtype", "dtype"), ("kernels vs portable", "kernels_vs_portable"),
         ("kernels vs CPU fp32", "kernels_vs_cpu_fp32"), ("portable vs CPU fp32", "portable_vs_cpu_fp32")],
    )
    if isinstance(payload["head"], list):
        table += "\n\n" + _common.markdown_table(
            payload["head"], [("point", "point"), ("L", "seq_len"), ("head", "head"), ("fwd+bwd s", "fwdbwd_s"),
                              ("peak MiB", "peak_mib")])
    if isinstance(payload["step"], list):
        table += "\n\n" + _common.markdown_table(
            payload["step"], [("head", "head"), ("model", "model"), ("step s", "step_s"), ("peak MiB", "peak_mib")])
    print("\n" + table)
    print(f"\nwrote {_common.write_outputs(args.out, payload, table)} in {payload['wall_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
