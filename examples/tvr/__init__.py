"""Text-video retrieval pipeline (CLIP4Clip + MUSE) used by ``examples/clip4clip_*.py``.

Not part of the installed ``muse_pyramid`` library; run from the repository root.
"""
