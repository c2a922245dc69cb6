"""Commands of `examples/clip4clip_<dataset>.py`, on the flags parsed by `args.py`.

Modes (exactly one): `--do_train` (train, select on validation, test once; `--do_eval` beside it is
accepted, as CLIP4Clip's launch lines pass both), `--do_eval` (evaluate `--init_model`), `--validate`
(or a leading `validate` word: count the files before spending GPU hours), `--cache` and `--demo`
(MSR-VTT only: synthetic data, small random CLIP, CPU, a few minutes). Errors are one line on stderr,
exit status 2; tracebacks only with `--log_level DEBUG`. Under torchrun only rank 0 logs below ERROR.
Tests: tests/examples/test_cli.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from .args import parse_args

__all__ = ["entry_point", "error_line", "main"]


def _run_validate(args: argparse.Namespace) -> int:
    """Print the counts of every split; exit status 1 when a video is missing, undecodable or refused."""
    from .build import data_options
    from .data.validate import validate

    bad = 0
    for split in ("train", "val", "test"):
        result = validate(args.dataset, args.data_path, args.features_path, split, decode=args.probe_videos,
                          show=20, **data_options(args))
        bad += result["missing"] + result.get("undecodable", 0) + result.get("refused", 0)
    return int(bad > 0)


def _setup_logging(level: str) -> None:
    """`--log_level` on rank 0 (or a single process); other torchrun ranks log errors only, so that every
    line appears once."""
    chosen = getattr(logging, str(level).upper(), logging.INFO)
    if int(os.environ.get("RANK", "0")) != 0:
        chosen = max(chosen, logging.ERROR)
    logging.basicConfig(level=chosen, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(chosen)  # also when logging was configured before (entry_point reads it)


def main(dataset: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `examples/clip4clip_<dataset>.py`; returns a process exit status."""
    args = parse_args(dataset, argv)
    _setup_logging(args.log_level)
    if args.validate:
        return _run_validate(args)
    if args.demo:
        from .demo import run_demo

        run_demo(output_dir=args.output_dir, seed=args.seed, progress=not args.no_progress)
        return 0

    from .distributed import cleanup_distributed, init_distributed

    info = init_distributed(args.device)
    try:
        if args.cache:
            from .cache import build_cache_from_args

            build_cache_from_args(args, info)
        elif args.do_train:
            from .train import train

            train(args, info)
        else:
            from .evaluate import run_eval

            run_eval(args, info)
    finally:
        cleanup_distributed()
    return 0


#: Errors whose message is the whole story (file, flag, remedy); others are shown with their type name.
_USER_ERRORS = (OSError, ValueError, FloatingPointError, KeyError)


def error_line(err: BaseException) -> str:
    """One line for the terminal: `error: <message>` (the type name too when it is not a user-facing error)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    if not isinstance(err, _USER_ERRORS):
        text = f"{type(err).__name__}: {text} (rerun with --log_level DEBUG for the traceback)"
    return f"error: {text}"


def entry_point(dataset: str, argv: Optional[Sequence[str]] = None) -> int:
    """`main` for the command line: any failure (a missing or malformed file, a bad flag combination, a
    diverged run, a cache that does not match) ends the run with one line `error: ...` on stderr and exit
    status 2; the traceback is printed too only with `--log_level DEBUG`."""
    try:
        return main(dataset, argv)
    except Exception as err:  # noqa: BLE001 (the command line reports every failure the same way)
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            import traceback

            traceback.print_exc()
        print(error_line(err), file=sys.stderr)
        return 2
