"""Text-video retrieval pipeline (CLIP4Clip + MUSE) used by ``examples/clip4clip_*.py``.

Not part of the installed ``muse_pyramid`` library: the scripts in ``examples/`` import it as ``tvr``
(their folder is on ``sys.path`` when they run). In a checkout without ``pip install -e .`` the library
is taken from the repository root.
"""

import sys
from pathlib import Path

try:
    import muse_pyramid  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(1, str(Path(__file__).resolve().parents[2]))
