"""Range checks of every numeric command-line flag, applied by `cli.parse_args` after the recipe defaults.

argparse's `type=float` accepts `nan`, `inf` and negative numbers, and `type=int` accepts 0 and
negatives: `--max_grad_norm -1` would clip with a negative factor (gradient ascent) and `--lr inf`
would train to NaN. Each flag here has a rule; a value outside it ends the parse with one line naming
the flag, the value and the range. `NUMERIC_RULES` must name every `int` / `float` flag of the parser
(tests/examples/test_guards.py checks that, so a new numeric flag cannot go unchecked).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["NUMERIC_RULES", "check_numeric_args", "numeric_dests"]

#: flag (dest) -> (description of the valid range, test). None values (flag unset, no default) pass.
Rule = Tuple[str, Callable[[Any], bool]]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pos_int(x: Any) -> bool:
    return isinstance(x, int) and x >= 1


def _nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and x >= 0


_POS_INT: Rule = ("an integer >= 1", _pos_int)
_NONNEG_INT: Rule = ("an integer >= 0", _nonneg_int)
_POS_FINITE: Rule = ("a finite number > 0", lambda x: _finite(x) and x > 0)
_UNIT: Rule = ("a number in [0, 1]", lambda x: _finite(x) and 0.0 <= x <= 1.0)

NUMERIC_RULES: Dict[str, Rule] = {
    # data
    "max_words": ("an integer >= 3 (start + at least one word + end)", lambda x: isinstance(x, int) and x >= 3),
    "max_frames": _POS_INT,
    "feature_framerate": ("an integer >= 0 (0: every frame)", _nonneg_int),
    "slice_framepos": ("0, 1 or 2", lambda x: x in (0, 1, 2)),
    "num_workers": _NONNEG_INT,
    # model
    "muse_depth": _POS_INT,
    "muse_d_state": _POS_INT,
    "muse_dropout": ("a number in [0, 1)", lambda x: _finite(x) and 0.0 <= x < 1.0),
    "muse_scales": ("a non-empty list of finite numbers > 0, e.g. 0.5,1,2",
                    lambda x: isinstance(x, list) and len(x) > 0 and all(_finite(s) and s > 0 for s in x)),
    "cross_num_hidden_layers": _POS_INT,
    # optimisation
    "batch_size": _POS_INT,
    "batch_size_val": _POS_INT,
    "epochs": _POS_INT,
    "lr": _POS_FINITE,
    "coef_lr": _POS_FINITE,
    "head_lr_mult": _POS_FINITE,
    "warmup_proportion": _UNIT,
    "max_grad_norm": _POS_FINITE,
    "grad_accum": _POS_INT,
    "frame_chunk_size": _POS_INT,
    "seed": ("an integer in [0, 2**63)", lambda x: isinstance(x, int) and 0 <= x < 2**63),
    # feature cache
    "cache_shard_clips": _POS_INT,
    "cache_shard_texts": _POS_INT,
}


def numeric_dests(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """dest -> option string of every parser flag whose type is numeric (`int`, `float`, or a list parser)."""
    out = {}
    for action in parser._actions:  # noqa: SLF001 (argparse has no public listing)
        kind = action.type
        numeric = kind in (int, float) or getattr(kind, "__name__", "") == "_floats"
        if numeric and action.option_strings:
            out[action.dest] = action.option_strings[0]
    return out


def check_numeric_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> None:
    """Check every flag of `NUMERIC_RULES`; `parser.error` (one line, exit status 2) on the first bad one,
    or `ValueError` without a parser."""
    for dest, (want, ok) in NUMERIC_RULES.items():
        value = getattr(args, dest, None)
        if value is None or ok(value):
            continue
        shown = ",".join(str(v) for v in value) if isinstance(value, list) else value
        message = f"--{dest} must be {want}, got {shown}"
        if parser is None:
            raise ValueError(message)
        parser.error(message)
    if args.small_clip is not None and not isinstance(args.small_clip, dict):
        message = f"--small_clip must be a JSON object of build_small_clip keyword arguments, got {args.small_clip!r}"
        if parser is None:
            raise ValueError(message)
        parser.error(message)
