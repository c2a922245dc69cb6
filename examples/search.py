"""Search your own videos with a trained model (or CLIP alone): build an index, then query it with text.

    python examples/search.py index path/to/videos --checkpoint runs/msrvtt_MUSE/model_best.pt
    python examples/search.py search "a man is cooking" --html

Run from anywhere; the code lives in `examples/tvr/search_cli.py` and `examples/tvr/search_index.py`
(see docs/search.md).
"""

import sys

from tvr.search_cli import entry_point  # `tvr` sits beside this script, on sys.path

if __name__ == "__main__":
    sys.exit(entry_point())
