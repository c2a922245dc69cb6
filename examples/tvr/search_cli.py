"""Command line of `examples/search.py`: index a folder of videos, then search it with text.

    python examples/search.py index VIDEOS --checkpoint runs/x/model_best.pt [--index DIR]
    python examples/search.py index VIDEOS --clip ViT-B/32 [--index DIR]        # CLIP alone, meanP
    python examples/search.py search "a man is cooking" [--index DIR] [--top_k 10] [--html [PAGE]]

`search` with `--videos VIDEOS --checkpoint ...` first brings the index up to date (new files only).
See docs/search.md. Tests: tests/examples/test_search.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["build_parser", "main", "entry_point"]

logger = logging.getLogger(__name__)

DEFAULT_INDEX = "video_index"


def _add_model_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("model (when indexing)")
    which = g.add_mutually_exclusive_group(required=required)
    which.add_argument("--checkpoint", help="the pipeline's model_best.pt / checkpoint_last.pt")
    which.add_argument("--clip", help="CLIP alone with meanP (zero-shot baseline): ViT-B/32, ViT-B/16 or a weights file")
    g.add_argument("--clip_weights_dir", help="folder with OpenAI's ViT-B-32.pt etc. (env MUSE_PYRAMID_CLIP_DIR)")
    for name, what in (("max_frames", "frames per video"), ("feature_framerate", "frames read per second"),
                       ("slice_framepos", "0 head, 1 tail, 2 uniform"), ("max_words", "text tokens")):
        g.add_argument(f"--{name}", type=int, help=f"{what} (default: the checkpoint's; MSR-VTT's recipe for --clip)")
    g.add_argument("--batch_size", type=int, default=8, help="videos per model call")
    g.add_argument("--num_workers", type=int, default=2, help="decoding processes")
    g.add_argument("--rebuild", action="store_true", help="drop the index's entries first (e.g. another model)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="search.py", description="Index your own videos with a trained model and "
                                "search them with text (exact cosine search).")
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="embed every new or changed video file of a folder (recursive)")
    ix.add_argument("videos", help="folder of video files")
    _add_model_flags(ix, required=False)
    se = sub.add_parser("search", help="rank the indexed videos for text queries")
    se.add_argument("queries", nargs="+", help="one or more text queries")
    se.add_argument("--top_k", type=int, default=10)
    se.add_argument("--html", nargs="?", const="", default=None,
                    help="also write a results page with keyframes (default <index>/search.html)")
    se.add_argument("--videos", help="first bring the index up to date with this folder (needs --checkpoint/--clip "
                                     "for a new index)")
    _add_model_flags(se, required=False)
    for q in (ix, se):
        q.add_argument("--index", default=DEFAULT_INDEX, help="index folder")
        q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
        q.add_argument("--no_progress", action="store_true")
        q.add_argument("--log_level", default="WARNING")
    return p


def _model(args: argparse.Namespace, index):
    from .search_index import load_search_model

    rule = {k: getattr(args, k) for k in ("max_frames", "feature_framerate", "slice_framepos", "max_words")}
    if args.checkpoint or args.clip:
        return load_search_model(args.checkpoint, args.clip, clip_weights_dir=args.clip_weights_dir,
                                 device=args.device, **rule)
    if index.model is None:
        raise ValueError(f"the index at {index.folder} is empty: give --checkpoint (or --clip) to build it")
    m = index.model  # the index's own model, checked against its checksum
    kind = {"checkpoint": m["path"]} if m["source"] == "checkpoint" else {"clip": m["path"]}
    return load_search_model(**kind, device=args.device, expect_sha256=m["sha256"],
                             **{k: m[k] for k in rule})


def _index(args: argparse.Namespace, index, videos: str):
    from .search_index import bytes_per_video

    model, source = _model(args, index)
    counts = index.update(videos, model, source, batch_size=args.batch_size, num_workers=args.num_workers,
                          rebuild=args.rebuild, progress=not args.no_progress)
    per_10k = bytes_per_video(source.dim) * 10_000 / 1e6
    print(f"indexed {videos} into {index.folder}: {counts['added']} added, {counts['changed']} changed, "
          f"{counts['moved']} moved, {counts['unchanged']} unchanged, {counts['removed']} removed, "
          f"{counts['failed']} failed; {counts['total']} videos ({source.sim_header}, D={source.dim}): "
          f"{index.memory_bytes / 1e6:.3g} MB of embeddings in memory, {per_10k:.3g} MB per 10,000 videos", flush=True)
    for path, reason in counts["failures"].items():
        print(f"  not indexed: {path}: {reason}", flush=True)
    return model, source


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `examples/search.py`; returns a process exit status."""
    from .search_index import VideoIndex, encode_queries, write_results_page

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    index = VideoIndex.open(args.index)
    if args.command == "index":
        _index(args, index, args.videos)
        return 0
    if args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}")
    if args.videos:
        model, source = _index(args, index, args.videos)
    else:
        index = VideoIndex.open(args.index, must_exist=True)
        model, source = _model(args, index)
    results: List = []
    for query, hits in zip(args.queries, index.search(encode_queries(model, source, args.queries), args.top_k)):
        results.append((query, hits))
        print(f'"{query}" ({len(index)} videos, {source.sim_header})')
        for i, (entry, score) in enumerate(hits):
            duration = f"  {entry.duration:.1f} s" if entry.duration else ""
            print(f"{i + 1:>4}  {score:.4f}  {entry.path}{duration}")
    if args.html is not None:
        page = write_results_page(args.html or Path(args.index) / "search.html", index, results)
        print(f"results page: {page}")
    return 0


def entry_point(argv: Optional[Sequence[str]] = None) -> int:
    """`main` with a one-line message and exit status 2 for a missing file or a bad value."""
    try:
        return main(argv)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
