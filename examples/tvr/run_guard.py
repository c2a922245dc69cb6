"""Guards of a training run's folder: no run silently replaces another, no resume silently changes one.

* `check_output_dir`: `--do_train` into an `--output_dir` that already holds a run (a checkpoint or
  `model_best.pt`) needs `--resume` (continue it) or `--overwrite` (start over).
* `run_identity` / `changed_args`: the flags that define a run (data, model, optimisation) are stored in
  every checkpoint (`run_args`); `--resume` compares them with the command line and refuses any
  difference unless `--allow_changed_args` is given (then every difference is logged).
Tests: tests/examples/test_guards.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .checkpoint import BEST_NAME, CHECKPOINT_NAME, PREV_NAME

__all__ = ["RUN_ARGS", "PATH_ARGS", "run_identity", "changed_args", "check_resume_args", "check_output_dir"]

logger = logging.getLogger(__name__)

#: Flags that define a run, by kind. A change of any of them on `--resume` is refused by default.
RUN_ARGS: Dict[str, Tuple[str, ...]] = {
    "data": ("dataset", "data_path", "features_path", "train_csv", "val_csv", "test_csv", "expand_msrvtt_sentences",
             "max_words", "max_frames", "feature_framerate", "slice_framepos", "skip_broken_videos", "cache_dir",
             "do_val"),
    "model": ("pretrained_clip_name", "random_init_clip", "small_clip", "sim_header", "muse_scales",
              "muse_aggregation", "muse_depth", "muse_mixer", "muse_d_state", "muse_dropout",
              "cross_num_hidden_layers", "frozen_clip"),
    "optimisation": ("batch_size", "epochs", "lr", "coef_lr", "head_lr_mult", "warmup_proportion", "max_grad_norm",
                     "grad_accum", "precision", "seed"),
}
#: Of those, the ones compared as absolute paths (a relative path given from another folder is the same).
PATH_ARGS = ("data_path", "features_path", "train_csv", "val_csv", "test_csv", "cache_dir")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_identity(args: argparse.Namespace) -> Dict[str, Any]:
    """`{flag: value}` of every flag of `RUN_ARGS` (paths made absolute), JSON-plain; stored in checkpoints."""
    out = {}
    for names in RUN_ARGS.values():
        for name in names:
            value = getattr(args, name, None)
            if name in PATH_ARGS and value:
                value = os.path.abspath(os.fspath(value))
            out[name] = _plain(value)
    return out


def changed_args(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[Tuple[str, str, Any, Any]]:
    """`(kind, flag, checkpoint value, command-line value)` for every run-defining flag that differs."""
    diff = []
    for kind, names in RUN_ARGS.items():
        for name in names:
            if name in saved and _plain(saved[name]) != _plain(current.get(name)):
                diff.append((kind, name, saved[name], current.get(name)))
    return diff


def check_resume_args(ckpt: Mapping[str, Any], args: argparse.Namespace, ckpt_path: Path) -> None:
    """Refuse (ValueError listing every difference) to resume `ckpt` with other run-defining flags, unless
    `args.allow_changed_args`; then the differences are logged as a warning."""
    saved = ckpt.get("run_args")
    if not isinstance(saved, Mapping):
        saved = ckpt.get("args") if isinstance(ckpt.get("args"), Mapping) else {}
        saved = {k: v for k, v in saved.items() if k not in PATH_ARGS}  # written before paths were absolute
    diff = changed_args(saved, run_identity(args))
    if not diff:
        return
    listed = "; ".join(f"--{name} ({kind}): checkpoint {old!r}, now {new!r}" for kind, name, old, new in diff)
    if not getattr(args, "allow_changed_args", False):
        raise ValueError(f"--resume {ckpt_path}: the run was started with other settings: {listed}. Resume with the "
                         "checkpoint's flags, start a new --output_dir, or pass --allow_changed_args to continue anyway")
    logger.warning("resuming %s with changed settings (--allow_changed_args): %s", ckpt_path, listed)


def check_output_dir(out_dir: Path, resume: Optional[str], overwrite: bool, *, remove: bool = True) -> None:
    """Refuse to start a new run in a folder that holds one (checkpoints or best weights) without `--overwrite`;
    with it, the old run's checkpoints are removed first (by the process with `remove`, the main one) so that
    nothing of it can be resumed or evaluated by mistake."""
    if resume:
        return
    found = [name for name in (CHECKPOINT_NAME, PREV_NAME, BEST_NAME) if (out_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise FileExistsError(f"--output_dir {out_dir} already holds a run ({', '.join(found)}): pass --resume to "
                              "continue it, --overwrite to replace it, or choose another --output_dir")
    if remove:
        logger.warning("--overwrite: replacing the run in %s (%s)", out_dir, ", ".join(found))
        for name in found:
            (out_dir / name).unlink(missing_ok=True)
