"""Put `examples/` on sys.path so tests import the pipeline as `tvr`, the one name its scripts use."""

import sys
from pathlib import Path

_EXAMPLES = str(Path(__file__).resolve().parents[2] / "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
