"""`python examples/report.py CHECKPOINT`: the retrieval report of a trained model in one command.

The data set, its paths (or feature cache), the frame rule and `max_words` are read from the run's
arguments stored in the checkpoint, and the pipeline's `--do_eval --report` runs with them; any other
pipeline flag given after the checkpoint is passed on and wins (e.g. `--data_path` when the data moved,
`--report_compare runs/meanp/eval_test`). Tests: tests/examples/test_report.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main"]

#: Run arguments carried from the checkpoint into the evaluation (when the checkpoint has them).
_CARRIED = ("data_path", "features_path", "cache_dir", "train_csv", "val_csv", "test_csv", "max_frames",
            "max_words", "feature_framerate", "slice_framepos")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import load_checkpoint
    from .cli import entry_point, error_line

    p = argparse.ArgumentParser(prog="report.py", description="Evaluate a checkpoint and write its retrieval "
                                "report (report.html), with the settings it was trained with.")
    p.add_argument("checkpoint", help="the pipeline's model_best.pt / checkpoint_last.pt")
    p.add_argument("--eval_split", default="test", choices=("train", "val", "test"))
    p.add_argument("--output_dir", help="default: <checkpoint folder>/eval_<split>")
    args, rest = p.parse_known_args(argv)
    ckpt = Path(args.checkpoint)
    try:
        saved = load_checkpoint(ckpt).get("args") or {}
    except Exception as err:  # noqa: BLE001 - missing, truncated or foreign: one line, as every command
        print(error_line(err), file=sys.stderr)
        return 2
    dataset = saved.get("dataset")
    if dataset is None:
        raise SystemExit(f"error: {ckpt} stores no run arguments; use the data set's entry point: "
                         "examples/clip4clip_<dataset>.py --do_eval --report --init_model ...")
    out_dir = args.output_dir or str(ckpt.parent / f"eval_{args.eval_split}")
    forward: List[str] = ["--do_eval", "--report", "--init_model", str(ckpt), "--eval_split", args.eval_split,
                          "--output_dir", out_dir]
    given = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
    for key in _CARRIED:
        if saved.get(key) is not None and f"--{key}" not in given:
            forward += [f"--{key}", str(saved[key])]
    if saved.get("expand_msrvtt_sentences") is False and "--expand_msrvtt_sentences" not in given:
        forward.append("--no-expand_msrvtt_sentences")
    return entry_point(dataset, forward + list(rest))
