"""Cost of one CLIP4Clip training step with CLIP4Clip's meanP pooling against the MUSE head.

One step, as in CLIP4Clip fine-tuning with the whole CLIP trainable:

    frames (B, T, 3, 224, 224) -> CLIP ViT token maps (B, T, 1+H*W, D) (after ln_post and proj)
        meanP: masked mean of the normalised CLS features        -> video embedding (B, D)
        MUSE:  MUSEHead (default config) -> `pool_video`           -> video embedding (B, D)
    captions (B, M) -> CLIP text tower (end-of-text feature)     -> text embedding  (B, D)
    symmetric InfoNCE on logit_scale * text @ video.T -> backward -> AdamW step

The CLIP is random-initialised (``open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)``);
weights do not change the cost. Frames and captions are random. Reported per head: the median step
time after warm-up and the peak extra memory of one step (after the optimizer state exists; see
`_common.py`), the matmul and convolution FLOPs of one step (``torch.utils.flop_counter``: the
arithmetic floor of the time ratio; the scan and elementwise work are not counted), and the
MUSE / meanP ratios. Each head runs in its own subprocess.

``--from_cache`` times the head-only step instead: random token maps of the same shape stand in for
cached CLIP outputs, the text embeddings are fixed random vectors, and only the head (and the logit
scale) is trained: head -> pooling -> InfoNCE -> backward -> AdamW.

    python benchmarks/bench_step.py                  # ViT-B/32, 12 frames, B=4
    python benchmarks/bench_step.py --from_cache     # head-only step on cached-shape token maps
    python benchmarks/bench_step.py --quick          # a tiny CLIP, under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

HEADS = ("meanP", "MUSE")
DEFAULT_OUT = "benchmarks/results/step_cpu.json"
TINY_CLIP = "tiny"  # a 2-layer CLIP with ViT-B/32's patch grid, for --quick


# -------------------------------------------------------------------------------------- models


def build_clip(name: str) -> nn.Module:
    """A random-initialised open_clip CLIP: an open_clip model name, or `TINY_CLIP`."""
    import open_clip

    if name != TINY_CLIP:
        return open_clip.create_model(name, pretrained=None)
    vision = open_clip.model.CLIPVisionCfg(layers=2, width=128, head_width=32, patch_size=32, image_size=224)
    text = open_clip.model.CLIPTextCfg(context_length=77, width=128, heads=4, layers=2)
    return open_clip.CLIP(128, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def clip_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images `(N, 3, H, W)` -> `(N, 1+H'*W', D)` token map after ln_post and the visual projection."""
    try:
        from muse_pyramid.backbones import open_clip_tokens
    except ImportError:  # an older checkout without the adapters: the same steps, written out
        open_clip_tokens = None
    if open_clip_tokens is not None:
        return open_clip_tokens(model, images)
    v = model.visual
    x = rearrange(v.conv1(images), "n d h w -> n (h w) d")
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1) + v.positional_embedding
    x = v.ln_post(v.transformer(v.ln_pre(v.patch_dropout(x))))
    return x @ v.proj


def info_nce(text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of unit-norm text `(B, D)` and video `(B, D)` embeddings, matched by row."""
    logits = logit_scale.exp() * text @ video.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def random_captions(batch: int, words: int, gen: torch.Generator) -> torch.Tensor:
    """`(B, M)` CLIP BPE ids: start token, random words, end token (the largest id) last."""
    ids = torch.randint(1, 49406, (batch, words), generator=gen)
    ids[:, 0], ids[:, -1] = 49406, 49407
    return ids


# -------------------------------------------------------------------------------------- worker


def build_step(cfg: Dict[str, Any]) -> Tuple[Callable[[], None], Dict[str, Any]]:
    """Build one (head, mode) training step in this process: `(step, facts about it)`."""
    from muse_pyramid import MUSEHead, pool_video
    from muse_pyramid.backbones import open_clip_text_features
    from muse_pyramid.ops import scan_backend

    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    b, t = cfg["batch"], cfg["frames"]

    clip = None if cfg["from_cache"] else build_clip(cfg["model"]).to(device).train()
    if clip is not None:
        dim = clip.text_projection.shape[1]
        size = clip.visual.image_size
        images = torch.randn(b, t, 3, *size, generator=gen).to(device)
        captions = random_captions(b, cfg["words"], gen).to(device)
        logit_scale = clip.logit_scale
        grid = clip.visual.grid_size
    else:
        dim, grid = cfg["dim"], (cfg["grid"], cfg["grid"])
        cached = torch.randn(b, t, 1 + grid[0] * grid[1], dim, generator=gen).to(device)
        text_cached = F.normalize(torch.randn(b, dim, generator=gen), dim=-1).to(device)
        logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    head = MUSEHead(dim, grid=tuple(grid)).to(device).train() if cfg["head"] == "MUSE" else None
    frame_mask = torch.ones(b, t, dtype=torch.bool, device=device)

    params: List[nn.Parameter] = [logit_scale] if clip is None else list(clip.parameters())
    if head is not None:
        params += list(head.parameters())
    # fused, as the reproduction pipeline builds it (examples/tvr/optim.py)
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-6, weight_decay=0.2,
                                  fused=fused or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"])

    def step() -> None:
        with autocast:
            if clip is None:
                tokens, text = cached, text_cached
            else:
                tokens = rearrange(clip_tokens(clip, rearrange(images, "b t c h w -> (b t) c h w")),
                                   "(b t) p d -> b t p d", b=b)
                text = F.normalize(open_clip_text_features(clip, captions).float(), dim=-1)
            frames = tokens[:, :, 0] if head is None else head(tokens, frame_mask)
            video = pool_video(frames.float(), frame_mask)
            loss = info_nce(text, video, logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))

    facts = {
        "dim": dim, "grid": list(grid), "trainable_params": sum(p.numel() for p in params),
        "head_params": 0 if head is None else sum(p.numel() for p in head.parameters()),
        "seq_len": None if head is None else head.sequence_length(t, tuple(grid)),
        "scan_backend_used": scan_backend(torch.empty(0, device=device)) if head is not None else None,
    }
    return step, facts


def worker(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Build one (head, mode) step and measure it in this process."""
    _common.configure_torch(cfg["threads"])
    device = torch.device(cfg["device"])
    step, facts = build_step(cfg)
    # one step first creates the optimizer state, so the memory step sees a steady state
    for _ in range(max(cfg["warmup"], 1)):
        step()
    mem = _common.peak_memory(step, device)
    timing = _common.time_runs(step, device, warmup=0, repeats=cfg["repeats"], budget_s=cfg["budget_s"],
                               first_call_s=mem["call_s"])
    # the arithmetic floor: matmul and convolution FLOPs of one step (torch's counter; the scan, the
    # causal conv kernel and elementwise ops are not counted)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return {
        **cfg, **facts,
        "step_s": timing["median_s"], "step_min_s": timing["min_s"], "step_runs_s": timing["runs_s"],
        "step_peak_mib": mem["peak_bytes"] / _common.MIB, "memory_method": mem["method"],
        "step_gflop": counter.get_total_flops() / 1e9,
    }


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser, DEFAULT_OUT)
    parser.add_argument("--model", default="ViT-B-32-quickgelu", help=f"open_clip model name, or '{TINY_CLIP}'")
    parser.add_argument("--batch", type=int, default=4, help="videos (and captions) per step")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--words", type=int, default=32, help="caption length M (CLIP4Clip's max_words)")
    parser.add_argument("--from_cache", action="store_true",
                        help="head-only step on random token maps shaped like cached CLIP outputs")
    parser.add_argument("--dim", type=int, default=512,
                        help="token width of the cached maps (--from_cache; --quick: at most 128)")
    parser.add_argument("--grid", type=int, default=7, help="patch grid side of the cached maps (--from_cache)")
    _common.add_amp_arg(parser)
    parser.add_argument("--rounds", type=int, default=2,
                        help="subprocess rounds per head, alternating heads; runs are pooled (peak: the largest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_ratio", action="store_true",
                        help="MUSE step from the feature cache against the online MUSE step, same batch (a ratio)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.rounds = 1, 1, 1
        if args.model == "ViT-B-32-quickgelu":
            args.model = TINY_CLIP
        args.batch, args.frames, args.dim = min(args.batch, 2), min(args.frames, 4), min(args.dim, 128)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        _common.report_worker_result(worker(json.loads(args.worker)))
        return {}
    if args.cache_ratio:
        return cache_vs_online(args)
    _common.configure_torch(args.threads)
    device = torch.device(args.device)
    amp = _common.amp_enabled(args.amp, device)
    base = {"device": str(device), "model": None if args.from_cache else args.model, "batch": args.batch,
            "frames": args.frames, "words": args.words, "from_cache": args.from_cache, "dim": args.dim,
            "grid": args.grid, "amp": amp, "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
            "budget_s": args.budget_s, "seed": args.seed}
    load_before = _common.load_average()
    rows = []
    for head in HEADS:
        rows.append({**base, "head": head, "step_runs_s": [], "rounds": []})
    # rounds alternate the heads, so a change in the machine's load hits both alike
    for round_ in range(args.rounds):
        for row in rows:
            res = _common.run_worker(__file__, {**base, "head": row["head"]}, args.timeout_s)
            row["rounds"].append(res)
            if "error" in res:
                row["error"] = res["error"]
                continue
            row.update({k: v for k, v in res.items() if k not in ("step_runs_s", "step_peak_mib", "step_s", "step_min_s")})
            row["step_runs_s"] += res["step_runs_s"]
            row["step_peak_mib"] = max(row.get("step_peak_mib", 0.0), res["step_peak_mib"])
            row["step_s"] = statistics.median(row["step_runs_s"])
            row["step_min_s"] = min(row["step_runs_s"])
            print(f"[{row['head']:>5}] round {round_ + 1}: step {res['step_s']:.4g} s, peak {res['step_peak_mib']:.1f} MiB",
                  flush=True)

    by_head = {r["head"]: r for r in rows if "error" not in r}
    ratios = {}
    if len(by_head) == len(HEADS):
        m, p = by_head["MUSE"], by_head["meanP"]
        ratios = {"step_time_muse_over_meanp": m["step_s"] / p["step_s"],
                  "step_min_time_muse_over_meanp": m["step_min_s"] / p["step_min_s"],
                  "step_peak_muse_over_meanp": m["step_peak_mib"] / max(p["step_peak_mib"], 1e-9),
                  "step_gflop_muse_over_meanp": m["step_gflop"] / max(p["step_gflop"], 1e-9)}
    machine = _common.machine_info(device)
    machine["load_average_before"], machine["load_average_after"] = load_before, _common.load_average()
    payload = {"benchmark": "step_from_cache" if args.from_cache else "step", "quick": args.quick,
               "machine": machine, "settings": {**base, "rounds": args.rounds},
               "rows": rows, "ratios": ratios}
    cols = [("head", "head"), ("model", "model"), ("B", "batch"), ("T", "frames"), ("L", "seq_len"),
            ("trainable params", "trainable_params"), ("step s (median)", "step_s"), ("step s (min)", "step_min_s"),
            ("peak extra MiB", "step_peak_mib"), ("GFLOP (matmul + conv)", "step_gflop"), ("timed steps", "n_runs"),
            ("error", "error")]
    text = _common.markdown_table([{**r, "n_runs": len(r.get("step_runs_s", [])) or None} for r in rows], cols)
    if ratios:
        text += "\n\n" + _common.markdown_table(
            [ratios], [("time MUSE / meanP (median)", "step_time_muse_over_meanp"),
                       ("time MUSE / meanP (min)", "step_min_time_muse_over_meanp"),
                       ("peak memory MUSE / meanP", "step_peak_muse_over_meanp"),
                       ("matmul + conv FLOPs MUSE / meanP", "step_gflop_muse_over_meanp")])
    out = _common.write_outputs(args.out, payload, text)
    print(text)
    print(f"\nwrote {out}")
    return payload


# ------------------------------------------------------------------ cached head-only step vs online step


def _cache_read_s(batch: int, shape: Sequence[int], repeats: int, seed: int) -> Dict[str, Any]:
    """Median time to read `batch` random clips `(T, 1+H*W, D)` from a memory-mapped fp16 shard as float32.

    The shard is written by the feature cache's writer (`examples/tvr/cache/format.py`) with 4 batches of
    clips and read right away, so the page cache is warm: the figure is the cost of the copy and the cast,
    a lower bound for a cold disk.
    """
    import tempfile
    import time

    import numpy as np

    sys.path.insert(0, str(_common.REPO))
    from tvr.cache.format import open_memmap, write_safetensors

    gen = torch.Generator().manual_seed(seed)
    n = 4 * batch
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "videos-00000.safetensors"
        write_safetensors(path, {"tokens": torch.randn(n, *shape, generator=gen).half()})
        tokens = open_memmap(path)["tokens"]
        runs = []
        for _ in range(max(repeats, 2)):
            rows = torch.randperm(n, generator=gen)[:batch].tolist()
            t0 = time.perf_counter()
            torch.stack([torch.from_numpy(np.array(tokens[r])).float() for r in rows])
            runs.append(time.perf_counter() - t0)
    return {"read_s": float(np.median(runs)), "read_runs_s": runs}


def cache_vs_online(args: argparse.Namespace) -> Dict[str, Any]:
    """`--cache_ratio`: the MUSE training step from the feature cache against the online MUSE step.

    online: `worker` with the whole CLIP trainable (CLIP4Clip fine-tuning) on frames and captions.
    cached: `worker` in `--from_cache` mode on token maps of the online CLIP's shape `(B, T, 1+H*W, D)`
    (what `CachedRetrievalDataset` yields) with fixed text features, training the head and the logit
    scale; plus the time to read that batch from a memory-mapped fp16 shard. Same B, T, D and grid.
    """
    _common.configure_torch(args.threads)
    device = torch.device(args.device)
    amp = _common.amp_enabled(args.amp, device)
    base = {"device": str(device), "model": args.model, "batch": args.batch, "frames": args.frames,
            "words": args.words, "dim": args.dim, "grid": args.grid, "amp": amp, "threads": args.threads,
            "warmup": args.warmup, "repeats": args.repeats, "budget_s": args.budget_s, "seed": args.seed,
            "head": "MUSE"}
    load_before = _common.load_average()
    online = {**base, "path": "online", **_common.run_worker(__file__, {**base, "from_cache": False}, args.timeout_s)}
    rows = [online]
    if "error" not in online:  # the cached maps take the online CLIP's width and grid
        shape = {"dim": online["dim"], "grid": online["grid"][0]}
        cached = {**base, **shape, "path": "cached", "model": None,
                  **_common.run_worker(__file__, {**base, **shape, "from_cache": True, "model": None}, args.timeout_s)}
        if "error" not in cached:
            tokens = (args.frames, 1 + online["grid"][0] * online["grid"][1], online["dim"])
            cached.update(_cache_read_s(args.batch, tokens, args.repeats, args.seed))
        rows.append(cached)
    for r in rows:
        print(f"[{r['path']:>6}] " + (r.get("error") or f"step {r['step_s']:.4g} s, peak {r['step_peak_mib']:.1f} MiB"),
              flush=True)
    ratios = {}
    if len(rows) == 2 and all("error" not in r for r in rows):
        o, c = rows
        ratios = {"step_time_cached_over_online": c["step_s"] / o["step_s"],
                  "step_time_cached_with_read_over_online": (c["step_s"] + c["read_s"]) / o["step_s"],
                  "step_peak_cached_over_online": c["step_peak_mib"] / max(o["step_peak_mib"], 1e-9)}
    machine = _common.machine_info(device)
    machine["load_average_before"], machine["load_average_after"] = load_before, _common.load_average()
    payload = {"benchmark": "step_cache_vs_online", "quick": args.quick, "machine": machine, "settings": base,
               "rows": rows, "ratios": ratios}
    cols = [("path", "path"), ("model", "model"), ("B", "batch"), ("T", "frames"), ("D", "dim"),
            ("trainable params", "trainable_params"), ("step s (median)", "step_s"), ("batch read s", "read_s"),
            ("peak extra MiB", "step_peak_mib"), ("error", "error")]
    text = _common.markdown_table(rows, cols)
    if ratios:
        text += "\n\n" + _common.markdown_table(
            [ratios], [("time cached / online", "step_time_cached_over_online"),
                       ("time cached + read / online", "step_time_cached_with_read_over_online"),
                       ("peak memory cached / online", "step_peak_cached_over_online")])
    out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.replace("step_cpu", f"step_cache_{device.type}")
    path = _common.write_outputs(out, payload, text)
    print(text)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
