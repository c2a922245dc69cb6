"""Retrieval evaluation: encode every clip once, score all texts against the cached embeddings.

The public release re-ran its head for every batch of texts; here each distinct clip of a split goes
through CLIP and the head exactly once (sharded over the processes under torchrun), its normalised
embedding is kept, and the (texts x clips) similarity is computed in row blocks. Metrics follow
`metrics.py` (pessimistic tie policy); dual-softmax (DSL) numbers are reported beside, never instead of,
the plain ones. Shapes: Nt texts, Nv distinct clips, D embedding width.
Tests: tests/examples/test_evaluate.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from .distributed import DistInfo
from .encode import encode_texts, encode_videos, score_embeddings
from .metrics import format_table
from .model import CLIP4Clip

__all__ = ["evaluate_samples", "results_table", "run_eval", "write_results"]

logger = logging.getLogger(__name__)










def evaluate_samples(
    model: CLIP4Clip,
    samples: Sequence,
    tokenize: Callable[[List[str]], torch.Tensor],
    frames,
    info: DistInfo,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    skip_broken: bool = False,
    dsl: bool = False,
    chunk_size: int = 4096,
    progress: bool = True,
    desc: str = "eval",
) -> Dict[str, Any]:
    """Metrics of `model` on a split's `samples` (t2v and v2t; DSL beside them when `dsl`).

    Returns a dict with `metrics`, optionally `dsl_metrics`, `n_texts`, `n_videos`, `skipped` and the
    cached `text (Nt, D)`, `video (Nv, D)` embeddings and `gt (Nt,)` (clip index of every text).
    """
    from .data.base import RetrievalDataset, group_by_video

    probe = RetrievalDataset(samples, tokenize, frames, skip_broken=skip_broken)
    samples = probe.samples
    clips, gt = group_by_video(samples)
    video_ds = RetrievalDataset(clips, tokenize, frames, skip_broken=False)
    video = encode_videos(model, video_ds, info, batch_size=batch_size, num_workers=num_workers,
                          progress=progress, desc=f"{desc} videos")
    text = encode_texts(model, tokenize, [s.text for s in samples], info.device, batch_size=max(batch_size, 64))
    return score_embeddings(model, text, video, gt, skipped=len(probe.skipped), dsl=dsl, chunk_size=chunk_size)




def results_table(result: Mapping[str, Any], title: Optional[str] = None) -> str:
    """Readable table: plain t2v / v2t rows, then the DSL rows (labelled) when present."""
    rows = dict(result["metrics"])
    if "dsl_metrics" in result:
        rows.update({f"{k} (DSL)": v for k, v in result["dsl_metrics"].items()})
    return format_table(rows, title=title)


def write_results(results: Mapping[str, Any], out_dir: Path, *, title: str, name: str = "results") -> str:
    """Write `<name>.json` and `<name>.txt` (the table) under `out_dir`; returns and prints the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = results.get("test") or results
    table = results_table(test, title=title)
    note = f"{test.get('n_texts')} texts x {test.get('n_videos')} videos; ties count against the model"
    if "dsl_metrics" in test:
        note += "; DSL = dual-softmax re-scoring over the whole test set (not comparable to plain numbers)"
    with open(out_dir / f"{name}.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    (out_dir / f"{name}.txt").write_text(f"{table}\n{note}\n", encoding="utf-8")
    print(f"{table}\n{note}", flush=True)
    return table


def run_eval(args, info: DistInfo) -> Dict[str, Any]:
    """`--do_eval`: evaluate `--init_model` (or a freshly built model) on the test split; write results."""
    from .build import (
        build_model_from_args,
        build_model_from_state,
        frame_config,
        load_model_state,
        load_samples,
        make_tokenizer,
    )

    if args.init_model:
        state, config = load_model_state(args.init_model)
        if config is None:  # a CLIP4Clip / release checkpoint: the head is described by the flags
            from .build import muse_options

            config = {"sim_header": args.sim_header, "muse": muse_options(args), "max_frames": args.max_frames}
            if args.sim_header == "MUSE":
                if "clip.visual.proj" not in state:
                    raise ValueError(f"--init_model {args.init_model}: no CLIP visual projection "
                                     "('clip.visual.proj') in it; is it a CLIP4Clip / MUSE checkpoint?")
                config["muse"]["dim"] = int(state["clip.visual.proj"].shape[1])
        model = build_model_from_state(state, config, frame_chunk_size=args.frame_chunk_size)
    else:
        logger.warning("--do_eval without --init_model: evaluating the untrained model")
        model = build_model_from_args(args)
    model.to(info.device)
    split = args.eval_split
    if getattr(args, "cache_dir", None):  # from the feature cache: the model's CLIP must be the cache's
        from .cache import CachedRetrievalDataset
        from .cache.training import eval_settings, evaluate_cache

        eval_settings(args, model, args.cache_dir, config if args.init_model else None)
        result = evaluate_cache(model, CachedRetrievalDataset(args.cache_dir, split, verify=getattr(args, "verify_cache", False)), info,
                                batch_size=args.batch_size_val, num_workers=args.num_workers, dsl=args.dsl,
                                progress=not args.no_progress, desc=split)
    else:
        tokenize = make_tokenizer(args.max_words)
        frames = frame_config(args, model.clip)
        result = evaluate_samples(model, load_samples(args, split), tokenize, frames, info,
                                  batch_size=args.batch_size_val, num_workers=args.num_workers,
                                  skip_broken=args.skip_broken_videos, dsl=args.dsl, progress=not args.no_progress,
                                  desc=split)
    out = {k: v for k, v in result.items() if k not in ("text", "video", "gt")}
    if info.is_main:
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"text": result["text"], "video": result["video"], "gt": result["gt"]},
                   out_dir / f"embeddings_{split}.pt")
        write_results(out, out_dir, title=f"{args.dataset} {split} ({model.sim_header}, "
                                          f"{args.init_model or 'untrained'})", name=f"eval_{split}")
        if getattr(args, "report", False):
            from .report import write_run_report

            write_run_report(args, model, split, result, out_dir)
    return out
