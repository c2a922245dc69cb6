"""Search your own videos with a trained model (or CLIP alone): build an index, then query it with text.

    python examples/search.py index path/to/videos --checkpoint runs/msrvtt_MUSE/model_best.pt
    python examples/search.py search "a man is cooking" --html

Run from anywhere; the code lives in `examples/tvr/search_cli.py` and `examples/tvr/search_index.py`
(see docs/search.md).
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
try:
    import muse_pyramid  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(1, str(_HERE.parent))

from tvr.search_cli import entry_point  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry_point())
