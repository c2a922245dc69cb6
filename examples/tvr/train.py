"""Training loop of the CLIP4Clip / MUSE recipe: one process, or many under `torchrun`.

Per epoch: train over the shuffled training split (DistributedSampler.set_epoch), evaluate on the
validation split, keep the best weights (`model_best.pt`), write `checkpoint_last.pt` atomically.
After the last epoch the best weights are evaluated ONCE on the test split. When the validation
split is the test split (MSR-VTT without `--val_csv`, as CLIP4Clip does), no selection is made on it:
the last epoch is kept and the test split is still evaluated once, at the end.

`--grad_accum K` splits each per-process batch into K micro-batches without changing the loss: the
embeddings of the whole batch are computed without gradients first, the global-batch loss gives the
gradient of every embedding, and each micro-batch is then re-run (same dropout RNG) and back-propagated
with those embedding gradients ("gradient caching"). The result equals one pass on the whole batch.
Training stops (`NonFiniteError`, naming the step and epoch) on a non-finite loss or gradient, before the
optimiser applies it, and refuses to save or select weights that are not finite. With fp16 and a
GradScaler a non-finite gradient is the scaler's normal overflow signal: the step is skipped and counted.
Tests: tests/examples/test_checkpoint.py, tests/examples/test_distributed.py, tests/examples/test_demo.py,
tests/examples/test_guards.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .build import (
    build_model_from_args,
    frame_config,
    load_model_state,
    load_samples,
    make_tokenizer,
    model_config,
)
from .checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    PREV_NAME,
    capture_rng_state,
    load_checkpoint,
    load_training_checkpoint,
    model_state_dict,
    restore_rng_state,
    save_atomic,
)
from .curves import TrainingCurves
from .distributed import DistInfo, barrier, make_loader, per_process_batch
from .encode import same_samples
from .evaluate import evaluate_samples, write_results
from .loss import contrastive_loss
from .model import CLIP4Clip
from .optim import build_optimizer, build_scheduler
from .run_guard import check_output_dir, check_resume_args, run_identity
from .runtime import autocast_context, seed_everything

__all__ = ["train_step", "train", "SELECTION_METRIC", "NonFiniteError",
           "check_finite_step", "check_finite_model"]

logger = logging.getLogger(__name__)

SELECTION_METRIC = ("t2v", "R@1")  # model selection on validation text-to-video R@1 (ties: R@5, R@10)


def _rng_snapshot(device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _rng_restore(snapshot: Tuple[torch.Tensor, Optional[torch.Tensor]], device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)


def train_step(
    model: nn.Module,
    batch: Dict[str, torch.Tensor],
    *,
    grad_accum: int = 1,
    precision: str = "fp32",
    scaler: Optional[torch.amp.GradScaler] = None,
) -> torch.Tensor:
    """Forward + backward of one (per-process) batch; returns the global-batch loss (detached).

    Args:
        model: the `CLIP4Clip`, possibly wrapped in DDP.
        batch: `text_ids (N, L)`, `video (N, T, 3, R, R)`, `video_mask (N, T)` on the model's device; from
            the feature cache, `text_feat (N, D)` and `tokens (N, T, 1+H*W, D)` take their places.
        grad_accum: micro-batches per batch (gradient caching; see the module docstring).
        scaler: an enabled `GradScaler` for fp16; None or disabled otherwise.
    Gradients are accumulated into `.grad`; the caller steps the optimiser.
    """
    core: CLIP4Clip = getattr(model, "module", model)
    text_ids = batch["text_feat"] if "text_feat" in batch else batch["text_ids"]
    video, mask = (batch["tokens"] if "tokens" in batch else batch["video"]), batch["video_mask"]
    device = video.device
    scale = (lambda x: scaler.scale(x)) if scaler is not None else (lambda x: x)
    if grad_accum == 1:
        with autocast_context(precision, device):
            text, vid, logit_scale = model(text_ids, video, mask)
        loss = contrastive_loss(text, vid, logit_scale)
        scale(loss).backward()
        return loss.detach()

    n = text_ids.shape[0]
    if n % grad_accum:
        raise ValueError(f"batch of {n} does not split into --grad_accum {grad_accum} micro-batches")
    parts = [slice(i, i + n // grad_accum) for i in range(0, n, n // grad_accum)]
    snapshots, texts, vids = [], [], []
    with torch.no_grad():  # pass 1: all embeddings, no graph
        for sl in parts:
            snapshots.append(_rng_snapshot(device))
            with autocast_context(precision, device):
                t, v, _ = core(text_ids[sl], video[sl], mask[sl])
            texts.append(t.float())
            vids.append(v.float())
    after = _rng_snapshot(device)
    text_all = torch.cat(texts).requires_grad_(True)
    vid_all = torch.cat(vids).requires_grad_(True)
    scale_leaf = core.logit_scale.detach().clone().requires_grad_(True)
    loss = contrastive_loss(text_all, vid_all, scale_leaf)
    scale(loss).backward()  # gradients of the (scaled) loss w.r.t. every embedding and the logit scale
    no_sync = getattr(model, "no_sync", None)
    for i, sl in enumerate(parts):  # pass 2: replay each micro-batch with the cached gradients
        _rng_restore(snapshots[i], device)
        last = i == len(parts) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast_context(precision, device):
                t, v, s = model(text_ids[sl], video[sl], mask[sl])
            surrogate = (t.float() * text_all.grad[sl]).sum() + (v.float() * vid_all.grad[sl]).sum()
            surrogate = surrogate + s * (scale_leaf.grad if last else torch.zeros_like(scale_leaf.grad))
            surrogate.backward()
    _rng_restore(after, device)
    return loss.detach()


class NonFiniteError(FloatingPointError):
    """Training diverged: a loss, a gradient or a weight is NaN or infinite."""


_REMEDY = "lower --lr, lower --max_grad_norm, or train in --precision fp32"


def check_finite_step(loss: torch.Tensor, grad_norm: torch.Tensor, *, epoch: int, step: int, info: DistInfo,
                      allow_grad_skip: bool = False) -> bool:
    """Stop (NonFiniteError) on a non-finite loss or gradient norm of global step `step` (1-based).

    The verdict is agreed over all processes (one scalar all-reduce) so that they all stop together.
    With `allow_grad_skip` (fp16 with a GradScaler, whose normal overflow handling skips such steps) a
    non-finite gradient with a finite loss returns True (the step is skipped and counted by the caller).
    """
    flags = torch.stack([(~torch.isfinite(loss.detach().float())).float().max(),
                         (~torch.isfinite(grad_norm.detach().float())).float().max()])
    if info.distributed:
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_loss, bad_grad = (bool(x) for x in flags.tolist())
    if bad_loss or (bad_grad and not allow_grad_skip):
        what = f"loss {float(loss):.4g}" if bad_loss else f"gradient norm {float(grad_norm):.4g}"
        raise NonFiniteError(f"training diverged at step {step} (epoch {epoch + 1}): non-finite {what}; nothing of "
                             f"this epoch was saved. Try: {_REMEDY}")
    return bad_grad


def check_finite_model(model: nn.Module, *, epoch: int) -> None:
    """NonFiniteError naming the first non-finite weight of `model` (never saved nor selected)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"training diverged in epoch {epoch + 1}: weight {name} is not finite; it was not "
                                 f"saved. Try: {_REMEDY}")


def _score(metrics: Dict[str, Any]) -> Tuple[float, ...]:
    block = metrics[SELECTION_METRIC[0]]
    return tuple(float(block[k]) for k in ("R@1", "R@5", "R@10"))


def train(args: argparse.Namespace, info: DistInfo,
          on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run `args.epochs` epochs (continuing a checkpoint with `args.resume`), then test once.

    Args:
        args: the parsed CLI namespace (see `cli.build_parser`).
        info: this process's rank / world / device.
        on_epoch_end: called on every process after an epoch's checkpoint is written, with the epoch
            and its log record (used by tests to stop a run).

    Returns:
        `{"history": [...], "best_epoch": e, "test": {...} | None}` (also written to
        `<output_dir>/results.json` by the main process).
    """
    out_dir = Path(args.output_dir)
    check_output_dir(out_dir, args.resume, getattr(args, "overwrite", False), remove=info.is_main)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    model = build_model_from_args(args)
    if args.init_model and not args.resume:
        state, _ = load_model_state(args.init_model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if info.is_main:
            logger.info("initialised from %s (%d tensors not in it, %d ignored)", args.init_model, len(missing),
                        len(unexpected))
    model.to(info.device)
    if args.frozen_clip:  # only the head and CLIP's logit scale train
        from .cache import weights_identity

        model.freeze_clip()
        args.frozen_clip_weights = weights_identity(args)  # recorded in checkpoints (build.model_config)
    if args.cache_dir:  # stored CLIP outputs instead of frames (see examples/tvr/cache)
        from .cache.training import cached_splits

        train_ds, evaluate_split, select_on_val = cached_splits(args, model, info)
    else:
        train_ds, evaluate_split, select_on_val = _online_splits(args, model, info)

    local_batch = per_process_batch(args.batch_size, info.world_size, args.grad_accum)
    loader = make_loader(train_ds, local_batch, info, train=True, seed=args.seed, num_workers=args.num_workers)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training samples give no full batch of {args.batch_size} over "
                         f"{info.world_size} processes; lower --batch_size")
    total_steps = steps_per_epoch * args.epochs
    optimizer = build_optimizer(model, lr=args.lr, coef_lr=args.coef_lr, head_lr_mult=args.head_lr_mult)
    scheduler = build_scheduler(optimizer, total_steps, args.warmup_proportion)
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16" and info.device.type == "cuda")

    ddp_model: nn.Module = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    start_epoch, step, best, best_epoch, history = 0, 0, None, None, []
    if args.resume:
        ckpt_path = Path(args.resume) if args.resume not in ("auto", "") else out_dir / CHECKPOINT_NAME
        ckpt, ckpt_path = load_training_checkpoint(ckpt_path, map_location=info.device)
        check_resume_args(ckpt, args, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = int(ckpt["epoch"]) + 1, int(ckpt["step"])
        best = tuple(ckpt["best_score"]) if ckpt.get("best_score") is not None else None
        best_epoch, history = ckpt.get("best_epoch"), list(ckpt.get("history", []))
        rng = ckpt["rng"]
        if len(rng) == info.world_size:
            restore_rng_state(rng[info.rank])
        else:
            logger.warning("checkpoint written by %d processes, resuming with %d: RNG streams re-seeded",
                           len(rng), info.world_size)
            seed_everything(args.seed + 1000 * start_epoch + info.rank)
        if info.is_main:
            logger.info("resumed from %s: epoch %d done, step %d", ckpt_path, start_epoch - 1, step)
    else:
        seed_everything(args.seed + info.rank)  # per-process data order / dropout streams

    from tqdm.auto import tqdm

    curves = TrainingCurves(optimizer, out_dir, is_main=info.is_main, tensorboard=getattr(args, "tensorboard", False))
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        ddp_model.train()
        t0, losses, skipped = time.time(), [], 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not info.is_main or args.no_progress,
                   leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            loss = train_step(ddp_model, batch, grad_accum=args.grad_accum, precision=args.precision, scaler=scaler)
            curves.step(step + 1, loss)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            skipped += check_finite_step(loss, grad_norm, epoch=epoch, step=step + 1, info=info,
                                         allow_grad_skip=scaler.is_enabled())
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale()
            step += 1
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        record: Dict[str, Any] = {"epoch": epoch, "step": step, "loss": float(np.mean(losses)),
                                  "seconds": time.time() - t0, "logit_scale": float(model.logit_scale.detach().exp())}
        if skipped:  # fp16: steps with overflowing gradients, skipped by the GradScaler
            record["skipped_steps"] = skipped
            if info.is_main:
                logger.warning("epoch %d: %d of %d steps skipped (fp16 gradient overflow)", epoch + 1, skipped,
                               len(losses))
        check_finite_model(model, epoch=epoch)
        if select_on_val:
            val = evaluate_split("val", False)
            record["val"] = val["metrics"]
            score = _score(val["metrics"])
            improved = best is None or score > best
        else:
            score, improved = None, True  # no selection: the latest epoch is the one kept
        if improved:
            best, best_epoch = score, epoch
        history.append(record)
        if info.is_main:
            logger.info("epoch %d: %s", epoch + 1, json.dumps(record))
            print(f"epoch {epoch + 1}/{args.epochs}: loss {record['loss']:.4f}"
                  + (f", val t2v R@1 {record['val']['t2v']['R@1']:.1f}" if "val" in record else "")
                  + f" ({record['seconds']:.0f}s)", flush=True)
        record["curve"] = curves.end_epoch(record)  # after the log line: per-step lists stay out of it
        _save_epoch(args, info, model, optimizer, scheduler, scaler, epoch, step, best, best_epoch, history,
                    improved)
        curves.write(history)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    # final test, once, with the selected weights
    results: Dict[str, Any] = {"history": history, "best_epoch": best_epoch,
                               "selection": "val t2v R@1" if select_on_val else "last epoch", "test": None}
    best_path = out_dir / BEST_NAME
    tested_epoch = history[-1]["epoch"] if history else best_epoch  # the weights in memory, without a best file
    if best_path.is_file():
        best_ckpt = load_checkpoint(best_path, map_location=info.device)
        model.load_state_dict(best_ckpt["model"])
        tested_epoch = int(best_ckpt.get("epoch", best_epoch))
        if best_epoch is not None and tested_epoch != best_epoch and info.is_main:
            # e.g. a resume from checkpoint_prev.pt after the latest checkpoint was damaged: the best file
            # can come from the lost epoch; the results name the epoch of the weights actually tested
            logger.warning("%s holds epoch %d while the run's record selects epoch %d; testing the file's weights",
                           best_path, tested_epoch + 1, best_epoch + 1)
        results["best_epoch"] = tested_epoch
    if args.do_test:
        test = evaluate_split("test", args.dsl)
        results["test"] = {k: v for k, v in test.items() if k not in ("text", "video", "gt")}
        if info.is_main:
            title = f"{args.dataset} test (epoch {int(tested_epoch) + 1}, {args.sim_header})"
            write_results(results, out_dir, title=title)
            if getattr(args, "report", False):
                from .report import write_run_report

                write_run_report(args, model, "test", test, out_dir)
    curves.finish(results)
    barrier()
    return results


def _online_splits(args: argparse.Namespace, model: CLIP4Clip, info: DistInfo):
    """Training set of decoded videos, an evaluation function `(split, dsl) -> result`, select on val?"""
    from .data.base import RetrievalDataset

    tokenize = make_tokenizer(args.max_words)
    frames = frame_config(args, model.clip)
    train_ds = RetrievalDataset(load_samples(args, "train"), tokenize, frames, skip_broken=args.skip_broken_videos)
    samples = {"val": load_samples(args, "val") if args.do_val else [], "test": load_samples(args, "test")}
    select_on_val = bool(samples["val"]) and not same_samples(samples["val"], samples["test"])
    if samples["val"] and not select_on_val:
        logger.warning("the validation split is the test split: no model selection on it (the last epoch is "
                       "kept); pass --val_csv with held-out videos to select on validation")

    def evaluate_split(split: str, dsl: bool) -> Dict[str, Any]:
        return evaluate_samples(model, samples[split], tokenize, frames, info, batch_size=args.batch_size_val,
                                num_workers=args.num_workers, skip_broken=args.skip_broken_videos, dsl=dsl,
                                progress=not args.no_progress, desc=split)

    return train_ds, evaluate_split, select_on_val


def _save_epoch(args, info: DistInfo, model: CLIP4Clip, optimizer, scheduler, scaler, epoch: int, step: int,
                best, best_epoch, history: List[Dict[str, Any]], improved: bool) -> None:
    """Every process contributes its RNG state; the main process writes best + last atomically."""
    rng = [capture_rng_state()]
    if info.distributed:
        import torch.distributed as dist

        gathered: List[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if info.is_main:
        cfg = model_config(model, args)
        weights = model_state_dict(model)
        if improved:
            save_atomic({"model": weights, "model_config": cfg, "epoch": epoch, "args": _plain_args(args)},
                        Path(args.output_dir) / BEST_NAME)
        out_dir = Path(args.output_dir)
        save_atomic({
            "model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng, "epoch": epoch, "step": step,
            "best_score": list(best) if best is not None else None, "best_epoch": best_epoch,
            "history": history, "model_config": cfg, "args": _plain_args(args), "run_args": run_identity(args),
            "world_size": info.world_size,
        }, out_dir / CHECKPOINT_NAME, keep_previous=out_dir / PREV_NAME)
    barrier()


def _plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x for x in v if isinstance(x, (bool, int, float, str))]
        elif isinstance(v, dict):
            out[k] = {str(a): b for a, b in v.items() if isinstance(b, (bool, int, float, str))}
    return out

