"""Flags of `examples/clip4clip_<dataset>.py`: CLIP4Clip's flag names, the published defaults.

Per-dataset defaults follow the published recipe (CLIP4Clip's README and MUSE's scripts) and are what
`--help` shows; a flag given on the command line always wins. Flags that belong to another data set
(`--train_csv` outside MSR-VTT, ...) are errors. Flags of CLIP4Clip that have no effect here are
accepted so existing scripts run; a non-default value of one we do not implement is an error rather
than silently ignored. Errors are one line on stderr, exit status 2. The commands that run on the
parsed flags are in `cli.py`. Tests: tests/examples/test_cli.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from muse_pyramid.config import AGGREGATIONS, MIXERS

from .model import SIM_HEADERS
from .report import add_report_arguments
from .validate_args import check_numeric_args

__all__ = ["DEMO_FLAGS", "RECIPES", "build_parser", "parse_args"]

logger = logging.getLogger(__name__)

_COMMON = {"batch_size_val": 16, "epochs": 5, "lr": 1e-4, "coef_lr": 1e-3, "feature_framerate": 1,
           "slice_framepos": 2}
#: Published settings per data set (global batch, i.e. summed over all processes); MSVD and LSMDC as
#: CLIP4Clip's README runs them.
RECIPES: Dict[str, Dict[str, Any]] = {
    "msrvtt": {**_COMMON, "max_words": 32, "max_frames": 12, "batch_size": 128},
    "didemo": {**_COMMON, "max_words": 64, "max_frames": 64, "batch_size": 64},
    "activitynet": {**_COMMON, "max_words": 64, "max_frames": 64, "batch_size": 64},
    "msvd": {**_COMMON, "max_words": 32, "max_frames": 12, "batch_size": 128},
    "lsmdc": {**_COMMON, "max_words": 32, "max_frames": 12, "batch_size": 128},
}
#: How each data set is named in messages, the files `--data_path` holds, and CLIP4Clip's `--datatype`.
NAMES = {"msrvtt": "MSR-VTT", "didemo": "DiDeMo", "activitynet": "ActivityNet Captions", "msvd": "MSVD",
         "lsmdc": "LSMDC"}
DATA_FILES = {
    "msrvtt": "MSRVTT_data.json and the csv files",
    "didemo": "{train,val,test}_list.txt and {train,val,test}_data.json",
    "activitynet": "train.json, val_1.json, train_ids.json, val_ids.json",
    "msvd": "raw-captions.pkl and {train,val,test}_list.txt",
    "lsmdc": "LSMDC16_annos_training.csv, LSMDC16_annos_val.csv, LSMDC16_challenge_1000_publictect.csv",
}
DATATYPES = {"msrvtt": "msrvtt", "didemo": "didemo", "activitynet": "activity", "msvd": "msvd", "lsmdc": "lsmdc"}
#: Flags that exist for some data sets only (every other script rejects them).
DATASET_FLAGS = {"--train_csv": ("msrvtt",), "--val_csv": ("msrvtt",), "--test_csv": ("msrvtt",),
                 "--expand_msrvtt_sentences": ("msrvtt",), "--no-expand_msrvtt_sentences": ("msrvtt",)}
#: Default head learning-rate multiplier per video head (MUSE: x10; CLIP4Clip's seqTransf: x1).
HEAD_LR_MULT = {"MUSE": 10.0, "seqTransf": 1.0, "meanP": 1.0}
#: CLIP4Clip flags accepted for compatibility, with the only value we support (None: any value, ignored).
_COMPAT = {"loose_type": None, "linear_patch": "2d", "datatype": None, "n_display": None, "local_rank": None,
           "freeze_layer_num": 0, "train_frame_order": 0, "eval_frame_order": 0,
           "task_type": None, "video_dim": None, "n_gpu": None, "world_size": None, "rank": None,
           "text_num_hidden_layers": None, "visual_num_hidden_layers": None, "margin": None,
           "hard_negative_rate": None, "negative_weighting": None, "n_pair": None, "resume_model": None,
           "do_pretrain": None, "do_lower_case": None}


#: Help of flags declared without one, so that `--help` lists them with their default.
_HELP = {
    "max_words": "caption length in tokens, start and end included",
    "max_frames": "frames per clip (sampled as --slice_framepos says, zero-padded below)",
    "feature_framerate": "frames read per second of video",
    "slice_framepos": "above max_frames keep the 0: first, 1: last, 2: uniformly spread frames",
    "num_workers": "data loader processes per training process",
    "sim_header": "video head",
    "muse_aggregation": "MUSE: order of the multi-scale tokens",
    "muse_depth": "MUSE: Mamba blocks",
    "muse_mixer": "MUSE: token mixer",
    "muse_d_state": "MUSE: SSM state size",
    "muse_dropout": "MUSE: dropout",
    "batch_size_val": "per-process evaluation batch",
    "epochs": "training epochs",
    "lr": "base learning rate",
    "warmup_proportion": "linear warm-up share of all steps, then cosine decay",
    "max_grad_norm": "gradient clipping norm",
    "seed": "seed of weights, data order and dropout",
    "log_level": "logging level (rank 0; other ranks log errors only)",
}


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.replace(",", " ").split()]


class _HelpFormatter(argparse.HelpFormatter):
    """Shows `(default: X)` only where X is the value a run really gets: not for switches (`--no_val` is on
    when given), not for `None` (a default that depends on other flags is spelled out in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                     argparse.BooleanOptionalAction))
        if "%(default)" in text or switch or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (`prog: error: ...`) on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_dataset_flags(data: argparse._ArgumentGroup, dataset: str) -> None:
    """The flags of `DATASET_FLAGS` that belong to `dataset`."""
    if dataset == "msrvtt":
        data.add_argument("--train_csv", help="training list (default: MSRVTT_train.9k.csv; or MSRVTT_train.7k.csv)")
        data.add_argument("--val_csv", help="held-out csv for model selection (default: none, the last epoch is "
                                            "kept; CLIP4Clip passed the test csv, never used for selection here)")
        data.add_argument("--test_csv", help="test csv (default: MSRVTT_JSFUSION_test.csv, the 1k-A test)")
        data.add_argument("--expand_msrvtt_sentences", action=argparse.BooleanOptionalAction, default=True,
                          help="every caption is a training sample (published; on by default); "
                               "--no-expand_msrvtt_sentences draws one caption per video per epoch")


def _reject_foreign_flags(argv: Sequence[str], dataset: str, parser: argparse.ArgumentParser) -> None:
    for token in argv:
        flag = token.split("=", 1)[0]
        owners = DATASET_FLAGS.get(flag)
        if owners and dataset not in owners:
            parser.error(f"{flag} does not apply to {NAMES[dataset]}: it is a flag of "
                         f"{', '.join(NAMES[o] for o in owners)} ({NAMES[dataset]} reads {DATA_FILES[dataset]} "
                         "in --data_path)")


def build_parser(dataset: str) -> argparse.ArgumentParser:
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(RECIPES)}")
    p = _Parser(
        prog=f"clip4clip_{dataset}.py",
        description=f"CLIP4Clip + MUSE text-video retrieval on {NAMES[dataset]} (defaults: the published recipe).",
        formatter_class=_HelpFormatter,
    )
    mode = p.add_argument_group("mode (choose one)")
    mode.add_argument("--do_train", action="store_true",
                      help="train, select on validation, test once (with --do_eval too: the same)")
    mode.add_argument("--do_eval", action="store_true", help="evaluate --init_model on --eval_split")
    mode.add_argument("--validate", action="store_true", help="count videos/captions/files of every split")
    mode.add_argument("--demo", action="store_true",
                      help="synthetic MSR-VTT-format data + small random CLIP + MUSE on CPU (a few minutes)"
                      if dataset == "msrvtt" else "MSR-VTT only: run examples/clip4clip_msrvtt.py --demo")
    mode.add_argument("--cache", action="store_true",
                      help="(or a leading `cache` word) run the frozen CLIP once over every split into --cache_dir")

    data = p.add_argument_group("data")
    data.add_argument("--data_path", help=f"folder with {DATA_FILES[dataset]}"
                      + (" (or MSRVTT_data.json itself)" if dataset == "msrvtt" else ""))
    data.add_argument("--features_path", help="video folder" + ("" if dataset == "msrvtt" else " (searched recursively)"))
    _add_dataset_flags(data, dataset)
    data.add_argument("--max_words", type=int)
    data.add_argument("--max_frames", type=int)
    data.add_argument("--feature_framerate", type=int)
    data.add_argument("--slice_framepos", type=int, choices=(0, 1, 2))
    data.add_argument("--skip_broken_videos", action="store_true",
                      help="skip (and count) missing/undecodable videos instead of failing")
    data.add_argument("--num_workers", "--num_thread_reader", dest="num_workers", type=int, default=4)
    data.add_argument("--probe_videos", action="store_true", help="--validate: also decode every video's first frame")
    data.add_argument("--eval_split", default="test", choices=("train", "val", "test"), help="--do_eval split")

    model = p.add_argument_group("model")
    model.add_argument("--pretrained_clip_name", default="ViT-B/32",
                       help="ViT-B/32, ViT-B/16 (OpenAI file in --clip_weights_dir) or a path to weights")
    model.add_argument("--clip_weights_dir", default=os.environ.get("MUSE_PYRAMID_CLIP_DIR"),
                       help="folder with OpenAI's ViT-B-32.pt etc. (default: env MUSE_PYRAMID_CLIP_DIR)")
    model.add_argument("--random_init_clip", action="store_true", help="random CLIP weights (explicitly only)")
    model.add_argument("--small_clip", type=json.loads, default=None,
                       help="JSON kwargs of a small random CLIP (build_small_clip), for demos/tests")
    model.add_argument("--sim_header", default="MUSE", choices=SIM_HEADERS)
    model.add_argument("--muse_scales", type=_floats, default=[0.5, 1.0, 2.0], help='e.g. "0.5,1,2"')
    model.add_argument("--muse_aggregation", default="scale_wise", choices=AGGREGATIONS)
    model.add_argument("--muse_depth", type=int, default=4)
    model.add_argument("--muse_mixer", default="bimamba", choices=MIXERS)
    model.add_argument("--muse_d_state", type=int, default=16)
    model.add_argument("--muse_dropout", type=float, default=0.1)
    model.add_argument("--cross_num_hidden_layers", type=int, default=4, help="seqTransf layers")
    model.add_argument("--init_model", help="weights to start from / evaluate (ours, CLIP4Clip's or MUSE's)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch_size", type=int, help="GLOBAL batch (split over processes)")
    opt.add_argument("--batch_size_val", type=int, help="per-process evaluation batch")
    opt.add_argument("--epochs", type=int)
    opt.add_argument("--lr", type=float)
    opt.add_argument("--coef_lr", type=float, help="CLIP lr = lr * coef_lr")
    opt.add_argument("--head_lr_mult", type=float, help="head lr = lr * this (default: 10 for MUSE, 1 for seqTransf "
                                                        "and meanP)")
    opt.add_argument("--warmup_proportion", type=float, default=0.1)
    opt.add_argument("--max_grad_norm", type=float, default=1.0)
    opt.add_argument("--grad_accum", "--gradient_accumulation_steps", dest="grad_accum", type=int, default=1,
                     help="micro-batches per batch (gradient caching: same loss as the full batch)")
    opt.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="AMP on CUDA")
    opt.add_argument("--fp16", action="store_true", help="CLIP4Clip's flag: same as --precision fp16")
    opt.add_argument("--grad_checkpointing", action="store_true", help="activation checkpointing in CLIP")
    opt.add_argument("--frame_chunk_size", type=int,
                     help="encode at most this many frames per CLIP call (default: all frames of a batch at once)")
    opt.add_argument("--seed", type=int, default=42)

    cache = p.add_argument_group("feature cache (frozen CLIP; see docs/reproduction.md)")
    cache.add_argument("--cache_dir", help="--cache: where to write it; --do_train --frozen_clip / --do_eval: "
                                           "read CLIP's token maps and text features from it (no videos needed)")
    cache.add_argument("--frozen_clip", action="store_true",
                       help="freeze CLIP except its logit scale: only the head and the logit scale train")
    cache.add_argument("--cache_shard_clips", type=int, default=256, help="clips per video shard")
    cache.add_argument("--cache_shard_texts", type=int, default=8192, help="texts per text shard")
    cache.add_argument("--verify_cache", action="store_true",
                       help="check every shard read against the sha256 in the cache manifest first")

    run = p.add_argument_group("run")
    run.add_argument("--output_dir", help=f"(default: runs/{dataset}_<sim_header>)")
    run.add_argument("--resume", nargs="?", const="auto",
                     help="continue from <output_dir>/checkpoint_last.pt (or the given checkpoint)")
    run.add_argument("--overwrite", action="store_true",
                     help="--do_train into an --output_dir that already holds a run: start over, replacing it")
    run.add_argument("--allow_changed_args", action="store_true",
                     help="--resume although data / model / optimisation flags differ from the checkpoint's")
    run.add_argument("--no_val", dest="do_val", action="store_false",
                     help="no per-epoch validation (validation runs every epoch unless given)")
    run.add_argument("--no_test", dest="do_test", action="store_false",
                     help="skip the final test evaluation (it runs unless given)")
    run.add_argument("--dsl", action="store_true", help="also report dual-softmax re-scored numbers")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    run.add_argument("--no_progress", action="store_true", help="no progress bars")
    run.add_argument("--log_level", default="INFO")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log loss, learning rates and metrics to <output_dir>/tensorboard (pip install tensorboard)")
    add_report_arguments(p)

    compat = p.add_argument_group("CLIP4Clip flags accepted for compatibility")
    for name in _COMPAT:
        compat.add_argument(f"--{name}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    p.set_defaults(dataset=dataset, **RECIPES[dataset])  # --help shows the data set's recipe
    for action in p._actions:
        if action.help is None and action.dest in _HELP:
            action.help = _HELP[action.dest]
    return p


def _apply_compat(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name, supported in _COMPAT.items():
        value = getattr(args, name)
        if value is None or supported is None:
            continue
        if str(value) != str(supported):
            parser.error(f"--{name} {value} is not supported here (only {supported})")
    if args.datatype not in (None, True, DATATYPES[args.dataset]):
        parser.error(f"--datatype {args.datatype} does not match this script (clip4clip_{args.dataset}.py reads "
                     f"{NAMES[args.dataset]}, --datatype {DATATYPES[args.dataset]})")
    if args.fp16:
        args.precision = "fp16"


#: The flags `--demo` honours; it refuses every other one instead of ignoring it.
DEMO_FLAGS = frozenset({"--demo", "--output_dir", "--seed", "--no_progress", "--log_level"})


def parse_args(dataset: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse `argv` and fill unset options from `RECIPES[dataset]`; validates flag combinations."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("validate", "cache"):
        argv = [f"--{argv[0]}"] + argv[1:]
    parser = build_parser(dataset)
    _reject_foreign_flags(argv, dataset, parser)
    args = parser.parse_args(argv)
    _apply_compat(args, parser)
    for key, value in RECIPES[dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.head_lr_mult is None:
        args.head_lr_mult = HEAD_LR_MULT[args.sim_header]
    if args.do_train and args.do_eval:  # CLIP4Clip's launch lines: train, evaluating on validation as it goes
        args.do_eval = False
    if args.demo and dataset != "msrvtt":
        parser.error(f"--demo exists for MSR-VTT only (synthetic MSR-VTT-format data): run "
                     f"examples/clip4clip_msrvtt.py --demo; for {NAMES[dataset]}, run the validate command on your files")
    modes = [m for m in ("do_train", "do_eval", "validate", "demo", "cache") if getattr(args, m)]
    if len(modes) != 1:
        parser.error(f"choose exactly one of --do_train, --do_eval, --validate, --demo, --cache (got {modes or 'none'})")
    if args.demo:  # a fixed recipe: any other flag would be ignored, so it is refused
        given = sorted({a.split("=", 1)[0] for a in argv if a.startswith("--")} - DEMO_FLAGS)
        if given:
            parser.error(f"--demo runs a fixed recipe (examples/tvr/demo.py) and takes only "
                         f"{', '.join(sorted(DEMO_FLAGS - {'--demo'}))}; got {', '.join(given)}")
    args.cache_dir = args.cache_dir or None  # CLIP4Clip scripts pass --cache_dir "" (its download cache)
    if args.cache and not args.cache_dir:
        parser.error("--cache needs --cache_dir (the folder to write the cache to)")
    if args.do_train and args.cache_dir and not args.frozen_clip:
        parser.error("training from --cache_dir needs --frozen_clip: the cache holds CLIP's outputs, so CLIP "
                     "cannot be fine-tuned from it")
    from_cache = bool(args.cache_dir) and (args.do_train or args.do_eval)
    if not (args.demo or from_cache) and (not args.data_path or not args.features_path):
        parser.error("--data_path and --features_path are required ("
                     + ("or run --demo, " if dataset == "msrvtt" else "") + "or read a --cache_dir)")
    if args.output_dir is None and not args.demo:
        args.output_dir = os.path.join("runs", f"{dataset}_{args.sim_header}")
    if args.random_init_clip and args.small_clip is not None:
        parser.error("--random_init_clip and --small_clip are exclusive")
    check_numeric_args(args, parser)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite are exclusive (continue the run, or replace it)")
    return args
