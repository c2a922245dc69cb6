"""CLIP4Clip + MUSE on MSVD: train, evaluate, validate the files or build its feature cache.

    python examples/clip4clip_msvd.py --help
    torchrun --nproc_per_node 8 examples/clip4clip_msvd.py --do_train --data_path ... --features_path ...

Run from anywhere; the pipeline lives in `examples/tvr/` (see `examples/tvr/args.py` for every flag).
"""

import sys

from tvr.cli import entry_point  # `tvr` sits beside this script, on sys.path

if __name__ == "__main__":
    sys.exit(entry_point("msvd"))
