"""Helpers for the pipeline tests: tiny CLIPs, tiny CLIP4Clip models, tiny synthetic runs.

Import as ``from tests.examples._pipeline_utils import ...`` (the folder's conftest puts the repository
root on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch
from tvr.args import parse_args
from tvr.model import CLIP4Clip, build_model, build_small_clip

#: A CLIP small enough for a CPU test: 16 px images, 8 px patches (2 x 2 grid), one 64-wide layer per tower.
TINY_CLIP = {"embed_dim": 32, "image_size": 16, "patch_size": 8, "vision_width": 64, "vision_layers": 1,
             "text_width": 64, "text_layers": 1, "context_length": 16, "vocab_size": 49408}
TINY_MUSE = {"depth": 1, "d_state": 4, "scales": (0.5, 1.0, 2.0)}


def tiny_clip(seed: int = 0, **overrides) -> torch.nn.Module:
    """The tests' one small random CLIP (`TINY_CLIP`, with `overrides`), in eval mode."""
    torch.manual_seed(seed)
    return build_small_clip(**{**TINY_CLIP, **overrides}).eval()


def tiny_model(sim_header: str = "MUSE", seed: int = 0, **muse) -> CLIP4Clip:
    clip = tiny_clip(seed)
    torch.manual_seed(seed + 1)
    return build_model(clip, sim_header=sim_header, muse={**TINY_MUSE, **muse}, max_frames=4)


def random_batch(gen: torch.Generator, batch: int = 4, frames: int = 3, words: int = 8,
                 side: int = TINY_CLIP["image_size"]) -> dict:
    """Random text ids (end token last), frames and a frame mask with some padded frames."""
    text = torch.randint(1, 49000, (batch, words), generator=gen)
    text[:, -1] = 49407
    video = torch.randn(batch, frames, 3, side, side, generator=gen)
    mask = torch.ones(batch, frames, dtype=torch.long)
    mask[::2, -1] = 0  # every other video is one frame short
    video[mask == 0] = 0
    return {"text_ids": text, "video": video, "video_mask": mask}


def make_tiny_msrvtt(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0):
    from tvr.data.synthetic import make_synthetic_msrvtt

    return make_synthetic_msrvtt(root, n_train_videos=n_train, n_test_videos=n_test, seconds=3, fps=2, size=16,
                                 seed=seed, captions_per_video=2)


def tiny_args(data, out_dir: Path, *extra: str, mode: str = "--do_train", argv: Optional[List[str]] = None):
    """CLI namespace of a tiny MSR-VTT run on `data` (a `SyntheticMSRVTT`) with the tiny CLIP."""
    base = [mode, "--data_path", str(data.root), "--features_path", str(data.features_path),
            "--output_dir", str(out_dir), "--small_clip", json.dumps(TINY_CLIP), "--max_frames", "3",
            "--max_words", "12", "--batch_size", "4", "--batch_size_val", "4", "--epochs", "2",
            "--num_workers", "0", "--muse_depth", "1", "--muse_d_state", "4", "--lr", "1e-3", "--coef_lr", "1",
            "--no_progress", "--device", "cpu", "--seed", "3"]
    return parse_args("msrvtt", base + list(extra) + list(argv or []))


def ddp_grad_worker(rank: int, world: int, init_file: str, out_dir: str, seed: int) -> None:
    """One process of the 2-process gloo check: DDP step on its slice of the global batch, for
    grad_accum 1 and 2; writes the loss and every parameter gradient to `<out_dir>/rank<r>.pt`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from tvr.train import train_step

    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model("MUSE", seed=seed, dropout=0.0)
        ddp = DistributedDataParallel(model)
        batch = random_batch(torch.Generator().manual_seed(seed), batch=4 * world)
        n = batch["text_ids"].shape[0] // world
        local = {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}
        out = {}
        for accum in (1, 2):
            model.zero_grad(set_to_none=True)
            loss = train_step(ddp, local, grad_accum=accum)
            out[accum] = {"loss": loss, "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
