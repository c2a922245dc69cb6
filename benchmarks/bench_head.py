"""Cost of the whole MUSE head against sequence length: bimamba vs mamba vs attention mixers, and meanP.

For each mixer at equal width and depth, and for CLIP4Clip's parameter-free meanP pooling (masked
mean of the CLS features), over the sequence lengths real settings produce (ViT-B/32 at 12 frames:
3,060 tokens; ViT-B/16 at 12 frames: 12,360; ViT-B/32 at 64 frames: 16,320; and a sweep of frames
and grids in between), measures:

- forward time: inference, ``torch.no_grad()``, head in eval mode;
- forward+backward time: training mode, tokens requiring grad (as when CLIP is fine-tuned), the
  loss a fixed random projection of the pooled video embedding, then ``backward()``;
- the peak extra memory of one call of each (see `_common.py` for how it is measured).

Times are medians of repeated runs after a warm-up. Every configuration runs in its own
subprocess. Results: a Markdown table on stdout and beside the JSON, the JSON, and a log-log PNG
of time and memory against sequence length with the fitted slope of each head.

On a GPU the mamba mixers run with every scan backend usable there (the PyTorch scan, and
mamba-ssm's kernels with causal-conv1d when installed) and attention with PyTorch's SDPA choice and
with flash attention forced; bf16 autocast is on by default there (``--amp``).

    python benchmarks/bench_head.py                  # full CPU sweep, B=1 (tens of minutes on 2 cores)
    python benchmarks/bench_head.py --quick          # under a minute
    python benchmarks/bench_head.py --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

MIXERS = ("bimamba", "mamba", "attention")
HEADS = ("meanP",) + MIXERS
# (frames, grid side): ViT-B/32 at 224 px has a 7x7 grid, ViT-B/16 a 14x14 one
FULL_POINTS: Tuple[Tuple[int, int], ...] = ((12, 7), (6, 14), (32, 7), (12, 14), (64, 7))
QUICK_POINTS: Tuple[Tuple[int, int], ...] = ((2, 7), (4, 7))
NAMED = {(12, 7): "ViT-B/32, 12 frames", (12, 14): "ViT-B/16, 12 frames", (64, 7): "ViT-B/32, 64 frames"}
TARGET_WINDOW = (3060, 16320)
TARGET_LENGTH = 12360
DEFAULT_OUT = "benchmarks/results/head_cpu.json"


# ------------------------------------------------------------------------------ configurations


def _variants(device: torch.device, heads: Sequence[str], scan_backends: str) -> List[Dict[str, Any]]:
    """(head, backend) pairs to run: automatic backends on CPU, every usable kernel on a GPU."""
    from muse_pyramid.ops import SCAN_BACKENDS, scan_backend

    usable = []
    for name in SCAN_BACKENDS:
        try:
            scan_backend(device, name)
            usable.append(name)
        except RuntimeError:
            continue
    every = scan_backends == "all" or (scan_backends == "auto" and device.type == "cuda")
    out: List[Dict[str, Any]] = []
    for head in heads:
        if head == "meanP":
            out.append({"head": head, "backend": None})
        elif head == "attention":
            out.append({"head": head, "backend": None})
            if device.type == "cuda":
                out.append({"head": head, "backend": "flash"})
        elif every:
            out.extend({"head": head, "backend": name} for name in usable)
        else:
            out.append({"head": head, "backend": None})
    return out


def _label(head: str, backend: Optional[str]) -> str:
    return head if backend is None else f"{head} [{backend}]"


# ---------------------------------------------------------------------------------------- worker


def _build(cfg: Dict[str, Any], device: torch.device) -> Tuple[torch.nn.Module, Any, int, int]:
    """The head (or None for meanP), its parameter count and its mixer sequence length."""
    from muse_pyramid import MUSEHead

    grid = (cfg["grid"], cfg["grid"])
    # meanP has no sequence; report the MUSE sequence of the same input so rows line up
    ref = MUSEHead(cfg["dim"], depth=1, mixer="attention", num_heads=cfg["num_heads"])
    length = ref.sequence_length(cfg["frames"], grid)
    if cfg["head"] == "meanP":
        return None, None, 0, length
    backend = cfg["backend"] if cfg["head"] != "attention" else None
    head = MUSEHead(
        cfg["dim"], depth=cfg["depth"], mixer=cfg["head"], d_state=cfg["d_state"], num_heads=cfg["num_heads"],
        grid=grid, scan_backend=backend, conv_backend=backend if backend in (None, "torch") else None,
    ).to(device)
    params = sum(p.numel() for p in head.parameters())
    return head, backend, params, length


def _attention_context(cfg: Dict[str, Any]) -> contextlib.AbstractContextManager:
    if cfg["head"] == "attention" and cfg["backend"] == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return contextlib.nullcontext()


def worker(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Measure one (head, backend, frames, grid) configuration in this process."""
    from muse_pyramid import pool_video
    from muse_pyramid.ops import conv_backend, scan_backend

    _common.configure_torch(cfg["threads"])
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    head, backend, params, length = _build(cfg, device)
    b, t, p, c = cfg["batch"], cfg["frames"], 1 + cfg["grid"] ** 2, cfg["dim"]
    tokens = torch.randn(b, t, p, c, generator=gen).to(device)
    weight = torch.randn(c, generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"])

    def run(train: bool) -> None:
        x = tokens.detach().requires_grad_(train)
        with torch.set_grad_enabled(train), autocast, _attention_context(cfg):
            frames = x[:, :, 0] if head is None else head.train(train)(x)
            loss = (pool_video(frames.float()) @ weight).sum()
        if train:
            loss.backward()
            if head is not None:
                head.zero_grad(set_to_none=True)

    result: Dict[str, Any] = {**cfg, "label": _label(cfg["head"], cfg["backend"]), "seq_len": length,
                              "input_tokens": t * p, "params": params}
    if head is not None and cfg["head"] != "attention":
        result["scan_backend_used"] = scan_backend(tokens, backend)
        result["conv_backend_used"] = conv_backend(tokens, backend if backend in (None, "torch") else None)
    for mode, train in (("fwd", False), ("fwdbwd", True)):
        # the memory call doubles as the first warm-up run
        mem = _common.peak_memory(lambda train=train: run(train), device)
        timing = _common.time_runs(
            lambda train=train: run(train), device,
            warmup=max(cfg["warmup"] - 1, 0), repeats=cfg["repeats"], budget_s=cfg["budget_s"],
            first_call_s=mem["call_s"] if cfg["warmup"] >= 1 else None,
        )
        result[f"{mode}_first_call_only"] = timing["first_call_only"]
        result[f"{mode}_s"] = timing["median_s"]
        result[f"{mode}_min_s"] = timing["min_s"]
        result[f"{mode}_runs_s"] = timing["runs_s"]
        result[f"{mode}_peak_mib"] = mem["peak_bytes"] / _common.MIB
        result["memory_method"] = mem["method"]
    return result


# ------------------------------------------------------------------------------------- summary


def summarise(rows: List[Dict[str, Any]], window: Tuple[int, int]) -> Dict[str, Any]:
    """Log-log slopes per head (over the lengths inside `window`, or all when fewer than two are) and
    the bimamba/attention ratio at each length both ran."""
    ok = [r for r in rows if "error" not in r]
    slopes: Dict[str, Dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in ok):
        mine = sorted((r for r in ok if r["label"] == label), key=lambda r: r["seq_len"])
        inside = [r for r in mine if window[0] <= r["seq_len"] <= window[1]]
        pts = inside if len({r["seq_len"] for r in inside}) >= 2 else mine
        entry: Dict[str, Any] = {"lengths": [r["seq_len"] for r in pts]}
        for key in ("fwd_s", "fwdbwd_s", "fwd_peak_mib", "fwdbwd_peak_mib"):
            entry[key] = _common.loglog_slope([r["seq_len"] for r in pts], [r[key] for r in pts])
        slopes[label] = entry
    ratios = []
    for att in (r for r in ok if r["label"] == "attention"):
        for mam in (r for r in ok if r["head"] == "bimamba" and r["seq_len"] == att["seq_len"]):
            ratios.append({
                "seq_len": att["seq_len"], "bimamba": mam["label"],
                "fwd_attention_over_bimamba": att["fwd_s"] / mam["fwd_s"],
                "fwdbwd_attention_over_bimamba": att["fwdbwd_s"] / mam["fwdbwd_s"],
                "fwdbwd_peak_attention_over_bimamba": att["fwdbwd_peak_mib"] / max(mam["fwdbwd_peak_mib"], 1e-9),
            })
    return {"slope_window": list(window), "loglog_slopes": slopes, "attention_vs_bimamba": ratios}


def table(rows: List[Dict[str, Any]]) -> str:
    cols = [("head", "label"), ("frames", "frames"), ("grid", "grid"), ("L", "seq_len"), ("params", "params"),
            ("fwd s", "fwd_s"), ("fwd+bwd s", "fwdbwd_s"), ("fwd peak MiB", "fwd_peak_mib"),
            ("fwd+bwd peak MiB", "fwdbwd_peak_mib"), ("timed runs", "n_runs"), ("error", "error")]
    shown = []
    for r in sorted(rows, key=lambda r: (HEADS.index(r["head"]), r.get("backend") or "", r["seq_len"])):
        shown.append({**r, "n_runs": len(r.get("fwdbwd_runs_s", [])) or None})
    return _common.markdown_table(shown, cols)


def summary_table(summary: Dict[str, Any]) -> str:
    rows = [{"label": k, **v} for k, v in summary["loglog_slopes"].items()]
    slope_cols = [("head", "label"), ("fwd time", "fwd_s"), ("fwd+bwd time", "fwdbwd_s"),
                  ("fwd peak memory", "fwd_peak_mib"), ("fwd+bwd peak memory", "fwdbwd_peak_mib")]
    ratio_cols = [("L", "seq_len"), ("bimamba", "bimamba"), ("fwd: attention / bimamba", "fwd_attention_over_bimamba"),
                  ("fwd+bwd: attention / bimamba", "fwdbwd_attention_over_bimamba"),
                  ("fwd+bwd peak memory: attention / bimamba", "fwdbwd_peak_attention_over_bimamba")]
    lo, hi = summary["slope_window"]
    return (f"Log-log slopes against L (fitted over {lo:,} <= L <= {hi:,} where two lengths fall there):\n\n"
            + _common.markdown_table(rows, slope_cols) + "\n\n"
            + _common.markdown_table(summary["attention_vs_bimamba"], ratio_cols))


def plot(rows: List[Dict[str, Any]], summary: Dict[str, Any], path: Path, title: str) -> Path:
    """Log-log PNG: forward time, forward+backward time and forward+backward peak memory against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fwd_s", "forward time (s)"), ("fwdbwd_s", "forward+backward time (s)"),
              ("fwdbwd_peak_mib", "forward+backward peak extra memory (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8))
    ok = [r for r in rows if "error" not in r]
    for ax, (key, name) in zip(axes, panels):
        for label, slopes in summary["loglog_slopes"].items():
            pts = sorted((r["seq_len"], r[key]) for r in ok if r["label"] == label and r[key] > 0)
            if not pts:
                continue
            slope = slopes.get(key)
            legend = f"{label} (slope {slope:.2f})" if slope is not None else label
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=legend)
        for length in (3060, 12360, 16320):
            ax.axvline(length, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser, DEFAULT_OUT)
    parser.add_argument("--batch", type=int, default=1, help="videos per batch (B=1 keeps long CPU runs affordable)")
    parser.add_argument("--dim", type=int, default=None, help="token width C (default 512, ViT-B CLIP; --quick: 128)")
    parser.add_argument("--depth", type=int, default=None, help="blocks, the same for every mixer (default 4; --quick: 2)")
    parser.add_argument("--d_state", type=int, default=16)
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--points", nargs="+", default=None, metavar="FRAMESxGRID",
                        help="sweep points as frames x grid side, e.g. 12x7 12x14 64x7 (default: the full sweep)")
    parser.add_argument("--scan_backends", default="auto", choices=("auto", "all"),
                        help="auto: the automatic backend on CPU, every usable one on a GPU; all: every usable one")
    _common.add_amp_arg(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", default=None, metavar="JSON",
                        help="take the rows of heads not in --heads from this earlier output (e.g. attention and "
                        "meanP, which do not depend on the scan, after a scan change); they are marked reused_from")
    parser.add_argument("--no_plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 1
    args.dim = args.dim or (128 if args.quick else 512)
    args.depth = args.depth or (2 if args.quick else 4)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        _common.report_worker_result(worker(json.loads(args.worker)))
        return {}
    _common.configure_torch(args.threads)
    device = torch.device(args.device)
    if args.points:
        points = [tuple(int(v) for v in p.lower().split("x")) for p in args.points]
    else:
        points = list(QUICK_POINTS if args.quick else FULL_POINTS)
    amp = _common.amp_enabled(args.amp, device)
    base = {"device": str(device), "batch": args.batch, "dim": args.dim, "depth": args.depth, "d_state": args.d_state,
            "num_heads": args.num_heads, "amp": amp, "threads": args.threads, "warmup": args.warmup,
            "repeats": args.repeats, "budget_s": args.budget_s, "seed": args.seed}
    load_before = _common.load_average()
    rows: List[Dict[str, Any]] = []
    for frames, grid in sorted(points, key=lambda fg: fg[0] * fg[1] ** 2):
        for variant in _variants(device, args.heads, args.scan_backends):
            cfg = {**base, **variant, "frames": frames, "grid": grid}
            row = _common.run_worker(__file__, cfg, args.timeout_s)
            row = {**cfg, "label": _label(variant["head"], variant["backend"]), **row}
            row.setdefault("seq_len", None)
            if row["seq_len"] is None:  # a failed worker: fill in L so the row still sorts and prints
                from muse_pyramid import MUSEHead

                row["seq_len"] = MUSEHead(args.dim, depth=1, mixer="attention").sequence_length(frames, (grid, grid))
            row["setting"] = NAMED.get((frames, grid))
            rows.append(row)
            status = row.get("error") or f"fwd {row['fwd_s']:.4g} s, fwd+bwd {row['fwdbwd_s']:.4g} s, " \
                                         f"peak {row['fwdbwd_peak_mib']:.1f} MiB"
            print(f"[{row['label']:>20}] L={row['seq_len']:>6} ({frames}x{grid}x{grid}): {status}", flush=True)

    if args.reuse:  # rows of heads not re-run here, from an earlier JSON of the same sweep
        earlier = json.loads(Path(args.reuse).read_text())
        keep = {(r["frames"], r["grid"]) for r in rows}
        for r in earlier["rows"]:
            if r["head"] not in args.heads and (r["frames"], r["grid"]) in keep:
                rows.append({**r, "reused_from": {"path": args.reuse, "git_commit": earlier["machine"]["git_commit"],
                                                  "date": earlier["machine"]["date"]}})
    summary = summarise(rows, TARGET_WINDOW)
    machine = _common.machine_info(device)
    machine["load_average_before"], machine["load_average_after"] = load_before, _common.load_average()
    payload = {"benchmark": "head", "quick": args.quick, "machine": machine, "settings": base,
               "rows": rows, "summary": summary}
    text = table(rows) + "\n\n" + summary_table(summary)
    out = _common.write_outputs(args.out, payload, text)
    if not args.no_plot:
        title = (f"MUSE head, B={args.batch}, C={args.dim}, depth {args.depth} on {machine['device']} "
                 f"({machine['cpu'] if device.type == 'cpu' else machine.get('gpu')}, {machine['torch_threads']} threads, "
                 f"scan {machine['scan_backend']}, torch {machine['torch']})")
        payload["plot"] = str(plot(rows, summary, out.with_suffix(".png"), title))
        out.write_text(json.dumps(payload, indent=2) + "\n")
    print(text)
    print(f"\nwrote {out}")
    return payload


if __name__ == "__main__":
    main()
