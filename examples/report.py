"""The retrieval report of a trained checkpoint (report.html with keyframes, R@K plot) in one command.

    python examples/report.py runs/demo/run/model_best.pt [--report_compare OTHER_REPORT] [--eval_split test]

Settings come from the checkpoint (see `examples/tvr/report_cli.py`); docs/reproduction.md explains the page.
"""

import sys

from tvr.report_cli import main  # `tvr` sits beside this script, on sys.path

if __name__ == "__main__":
    sys.exit(main())
