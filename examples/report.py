"""The retrieval report of a trained checkpoint (report.html with keyframes, R@K plot) in one command.

    python examples/report.py runs/demo/run/model_best.pt [--report_compare OTHER_REPORT] [--eval_split test]

Settings come from the checkpoint (see `examples/tvr/report_cli.py`); docs/reproduction.md explains the page.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
try:
    import muse_pyramid  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(1, str(_HERE.parent))

from tvr.report_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
