"""CLIP4Clip + MUSE on MSVD: train, evaluate, validate the files or build its feature cache.

    python examples/clip4clip_msvd.py --help
    torchrun --nproc_per_node 8 examples/clip4clip_msvd.py --do_train --data_path ... --features_path ...

Run from anywhere; the pipeline lives in `examples/tvr/` (see `examples/tvr/args.py` for every flag).
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
try:
    import muse_pyramid  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(1, str(_HERE.parent))

from tvr.cli import entry_point  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry_point("msvd"))
