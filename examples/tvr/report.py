"""Retrieval report: a folder with `report.html` that shows what the model retrieves, query by query.

For a sample of text queries (default 50: the worst-ranked half first, then a random half) the page
shows the query, the rank of its correct video, and the top-k videos as keyframe strips (JPEG files in
`frames/`, one strip per clip, cut from the frames the model sees: same frame rule, same centre crop),
the correct video marked. A plot of R@K against K for both directions (`recall_at_k.png`) and the
metrics table head the page. Given a second run's report of the same split (`--report_compare`, e.g.
meanP beside MUSE), both runs' metrics, curves and top-k strips are shown side by side.

Everything the page shows is also in `report.json` (texts, clips, ranks, top-k and scores of every
query), so a report can be rebuilt or compared later without the model. The folder needs no server
and no network: open `report.html` in a browser. Shape letters: Nt texts, Nv clips.
Tests: tests/examples/test_report.py.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .metrics import chunked_similarity, metrics_from_ranks, t2v_ranks, v2t_ranks

__all__ = ["REPORT_DIR", "REPORT_JSON", "add_report_arguments", "report_data", "select_queries", "recall_at_k",
           "build_report", "load_report", "write_run_report", "keyframe_strip", "IMAGE_CHECK_SCRIPT"]

logger = logging.getLogger(__name__)

REPORT_DIR = "report"  # sub-folder of the run's output folder
REPORT_JSON = "report.json"
REPORT_VERSION = 1

#: Marks the page once every image has loaded or failed: `<body data-images-total=N data-images-broken=M>`.
#: Harmless for readers; lets a headless browser check the page (tests/examples/test_report.py).
IMAGE_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (im) { return !(im.complete && im.naturalWidth > 0); });
  document.body.setAttribute("data-images-total", imgs.length);
  document.body.setAttribute("data-images-broken", broken.length);
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
section.query { border-top: 1px solid #ddd; padding: 0.6em 0; }
.run { display: flex; align-items: flex-start; gap: 0.8em; margin: 0.3em 0; }
.run .who { min-width: 9em; font-size: 0.9em; }
.hits { display: flex; flex-wrap: wrap; gap: 0.5em; }
figure.hit { margin: 0; padding: 3px; border: 3px solid transparent; font-size: 0.8em; }
figure.hit.correct { border-color: #1a9a3a; background: #e8f6ec; }
figure.hit.outside { border-style: dashed; }
figure.hit img { display: block; height: 64px; image-rendering: pixelated; }
.nofr { display: block; height: 64px; width: 128px; background: #eee; color: #777; text-align: center; }
.bad { color: #b00020; }
</style>"""


# ------------------------------------------------------------------------------ data
def report_data(text: torch.Tensor, video: torch.Tensor, gt: torch.Tensor, texts: Sequence[str],
                clips: Sequence[Sequence[Any]], *, label: str, title: str = "", top_k: int = 10,
                frames: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
    """Everything a report shows about one run on one split, as plain data (`report.json`).

    Args:
        text: `(Nt, D)` L2-normalised text embeddings.
        video: `(Nv, D)` L2-normalised clip embeddings.
        gt: `(Nt,)` clip index of every text.
        texts: the `Nt` query strings.
        clips: `Nv` entries `(video_id, path, start, end)` (start / end in seconds or None).
        label: the run's name in the page, e.g. its `sim_header`.
        top_k: retrieved clips kept per query (for every query, not only the shown ones).
        frames: the frame rule used for keyframes (`max_frames`, `feature_framerate`, `slice_framepos`).
    """
    if text.ndim != 2 or video.ndim != 2 or text.shape[1] != video.shape[1]:
        raise ValueError(f"text (Nt, D) and video (Nv, D) must share D, got {tuple(text.shape)} and "
                         f"{tuple(video.shape)}")
    if len(texts) != text.shape[0] or len(clips) != video.shape[0] or tuple(gt.shape) != (text.shape[0],):
        raise ValueError(f"texts ({len(texts)}), gt {tuple(gt.shape)} and clips ({len(clips)}) must match "
                         f"text {tuple(text.shape)} and video {tuple(video.shape)}")
    sim = chunked_similarity(text.float(), video.float().to(text.device))
    gt = gt.long().cpu()
    scores, top = sim.topk(min(top_k, sim.shape[1]), dim=1)
    t2v, v2t = t2v_ranks(sim, gt), v2t_ranks(sim, gt)
    return {
        "version": REPORT_VERSION, "label": label, "title": title or label,
        "n_texts": int(text.shape[0]), "n_videos": int(video.shape[0]),
        "metrics": {"t2v": metrics_from_ranks(t2v), "v2t": metrics_from_ranks(v2t)},
        "texts": list(texts), "clips": [[str(c[0]), str(c[1]), c[2], c[3]] for c in clips], "gt": gt.tolist(),
        "t2v_rank": t2v.tolist(), "v2t_rank": v2t.tolist(),
        "gt_score": sim.gather(1, gt[:, None])[:, 0].tolist(),
        "topk": top.tolist(), "topk_score": [[round(float(s), 5) for s in row] for row in scores],
        "frames": dict(frames or {}),
    }


def load_report(path: str | os.PathLike) -> Dict[str, Any]:
    """A `report.json`, given itself, its report folder, or the run folder holding `report/`."""
    path = Path(path)
    for candidate in (path, path / REPORT_JSON, path / REPORT_DIR / REPORT_JSON):
        if candidate.is_file():
            data = json.loads(candidate.read_text(encoding="utf-8"))
            if data.get("version") != REPORT_VERSION or "t2v_rank" not in data:
                raise ValueError(f"{candidate} is not a retrieval report of version {REPORT_VERSION}")
            return data
    raise FileNotFoundError(f"no {REPORT_JSON} at {path} (nor in {path / REPORT_DIR}); write one with --report")


def select_queries(ranks: Sequence[int], n: int, *, seed: int = 0, worst_fraction: float = 0.5) -> List[int]:
    """Indices of the queries to show: the `n * worst_fraction` worst-ranked first (worst first, ties by
    index), then random others (in a seeded order), `min(n, len(ranks))` in all."""
    if n < 0 or not 0.0 <= worst_fraction <= 1.0:
        raise ValueError(f"n must be >= 0 and worst_fraction in [0, 1], got n={n}, worst_fraction={worst_fraction}")
    ranks = np.asarray(ranks)
    n = min(n, len(ranks))
    n_worst = int(round(n * worst_fraction))
    worst = sorted(range(len(ranks)), key=lambda i: (-int(ranks[i]), i))[:n_worst]
    rest = np.setdiff1d(np.arange(len(ranks)), np.asarray(worst, dtype=np.int64))
    rng = np.random.default_rng(seed)
    return worst + rng.permutation(rest)[: n - n_worst].tolist()


def recall_at_k(ranks: Sequence[int], max_k: int) -> np.ndarray:
    """`(max_k,)` R@K in percent for K = 1..max_k, from 1-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no ranks: the report needs at least one query")
    counts = np.bincount(np.clip(ranks, 1, max_k + 1), minlength=max_k + 2)[1 : max_k + 1]
    return np.cumsum(counts) * 100.0 / ranks.size


def _plot_recall(runs: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, name, pool in ((axes[0], "t2v_rank", "text → video", "n_videos"),
                                (axes[1], "v2t_rank", "video → text", "n_texts")):
        for run, style in zip(runs, ("-", "--", ":", "-.")):
            k = np.arange(1, int(run[pool]) + 1)
            ax.plot(k, recall_at_k(run[key], len(k)), style, label=run["label"])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("K")
        ax.set_ylabel("R@K (%)")
        ax.set_ylim(0, 100)
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ keyframes
@dataclass(frozen=True)
class _FrameRule:
    max_frames: int = 12
    feature_framerate: int = 1
    slice_framepos: int = 2


def keyframe_strip(path: str | os.PathLike, start: Optional[float], end: Optional[float], *, out: Path,
                   rule: Mapping[str, int], n_frames: int = 4, size: int = 96) -> Optional[str]:
    """Write `n_frames` of the frames the model sees (the frame rule `rule`, centre crop at `size` px) side by
    side as one JPEG at `out`; returns None when written, else why not (missing or undecodable video)."""
    from PIL import Image

    from .video import FrameConfig, VideoDecodeError, decode_frames, select_frames

    r = _FrameRule(**{k: int(v) for k, v in rule.items() if k in _FrameRule.__dataclass_fields__})
    try:
        images = decode_frames(path, FrameConfig(max_frames=r.max_frames, feature_framerate=r.feature_framerate,
                                                 slice_framepos=r.slice_framepos, image_resolution=size), start, end)
    except VideoDecodeError as err:
        return err.reason
    keep = select_frames(len(images), n_frames, 2)
    strip = np.concatenate([images[k] for k in keep], axis=1)  # (R, n*R, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(out, quality=85)
    return None


# ------------------------------------------------------------------------------ page
def _metrics_table(runs: Sequence[Mapping[str, Any]]) -> str:
    cols = ("R@1", "R@5", "R@10", "MdR", "MnR", "n")
    rows = []
    for run in runs:
        for direction in ("t2v", "v2t"):
            m = run["metrics"][direction]
            cells = "".join(f"<td>{m[c]:.1f}</td>" if c != "n" else f"<td>{m[c]}</td>" for c in cols)
            rows.append(f"<tr><td>{html.escape(run['label'])} {direction}</td>{cells}</tr>")
    head = "".join(f"<th>{c}</th>" for c in cols)
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _figure(clip_index: int, clip: Sequence[Any], rank: Optional[int], score: float, correct: bool,
            frame_src: Dict[int, Optional[str]], outside: bool = False) -> str:
    vid = html.escape(str(clip[0]))
    classes = "hit" + (" correct" if correct else "") + (" outside" if outside else "")
    src = frame_src.get(clip_index)
    picture = (f'<img src="{html.escape(src)}" alt="{vid}" loading="eager">' if src
               else '<span class="nofr">no frames</span>')
    where = f"{rank}. " if rank is not None and not outside else ("correct: " if outside else "")
    mark = " ✓" if correct else ""
    return (f'<figure class="{classes}" data-video-id="{vid}" data-clip="{clip_index}"'
            f'{f" data-rank={rank}" if rank is not None else ""}>{picture}'
            f"<figcaption>{where}{vid} · {score:.3f}{mark}</figcaption></figure>")


def _run_row(run: Mapping[str, Any], q: int, frame_src: Dict[int, Optional[str]]) -> str:
    gt, rank = int(run["gt"][q]), int(run["t2v_rank"][q])
    figs = [_figure(c, run["clips"][c], i + 1, s, c == gt, frame_src)
            for i, (c, s) in enumerate(zip(run["topk"][q], run["topk_score"][q]))]
    if gt not in run["topk"][q]:
        figs.append(_figure(gt, run["clips"][gt], rank, run["gt_score"][q], True, frame_src, outside=True))
    cls = "who bad" if rank > 1 else "who"
    return (f'<div class="run" data-run="{html.escape(run["label"])}" data-gt-rank="{rank}">'
            f'<div class="{cls}"><b>{html.escape(run["label"])}</b><br>rank {rank} of {run["n_videos"]}</div>'
            f'<div class="hits">{"".join(figs)}</div></div>')


def _same_split(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["texts"] == b["texts"] and [c[0] for c in a["clips"]] == [c[0] for c in b["clips"]] and a["gt"] == b["gt"]


def build_report(out_dir: str | os.PathLike, run: Mapping[str, Any], compare: Optional[Mapping[str, Any]] = None,
                 *, n_queries: int = 50, top_k: int = 5, n_keyframes: int = 4, thumb_size: int = 96,
                 seed: int = 0, workers: int = 4) -> Path:
    """Write `report.html`, `report.json`, `recall_at_k.png` and `frames/` under `out_dir`; returns the page.

    Args:
        run: `report_data(...)` of the run the report is about.
        compare: another run's `report_data` (e.g. meanP beside MUSE); its top-k is shown under the
            run's for every query when both cover the same split, else only its metrics and curves.
        n_queries: queries shown (the worst-ranked half first, then random ones).
        top_k: clips shown per query (at most the `top_k` stored in the data).
        n_keyframes, thumb_size: frames per strip and their side in pixels.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(run), encoding="utf-8")
    # the stored top-k may be longer than what is shown
    runs = [{**r, "topk": [t[:top_k] for t in r["topk"]], "topk_score": [s[:top_k] for s in r["topk_score"]]}
            for r in ([run] + ([compare] if compare is not None else []))]
    run, compare = runs[0], (runs[1] if compare is not None else None)
    _plot_recall(runs, out / "recall_at_k.png")
    side = compare is not None and _same_split(run, compare)
    if compare is not None and not side:
        logger.warning("the compared report covers other texts or clips: only its metrics and curves are shown")
    shown = select_queries(run["t2v_rank"], n_queries, seed=seed)
    n_worst = int(round(len(shown) * 0.5))

    needed = sorted({c for r in (runs if side else [run]) for q in shown for c in [*r["topk"][q], r["gt"][q]]})
    rule = run.get("frames") or {}

    def strip(c: int) -> Optional[str]:
        vid, path, start, end = run["clips"][c]
        rel = f"frames/clip{c:06d}.jpg"
        why = keyframe_strip(path, start, end, out=out / rel, rule=rule, n_frames=n_keyframes, size=thumb_size)
        if why is not None:
            logger.warning("report: no keyframes for %s (%s): %s", vid, path, why)
            return None
        return rel

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PyAV decodes outside the GIL
        frame_src = dict(zip(needed, pool.map(strip, needed)))

    sections = []
    for i, q in enumerate(shown):
        gt = int(run["gt"][q])
        kind = "worst-ranked" if i < n_worst else "random"
        rows = _run_row(run, q, frame_src) + (_run_row(compare, q, frame_src) if side else "")
        sections.append(
            f'<section class="query" data-query="{q}" data-gt="{html.escape(str(run["clips"][gt][0]))}">'
            f'<h3>{i + 1}. “{html.escape(run["texts"][q])}” <small>({kind}; correct video '
            f'{html.escape(str(run["clips"][gt][0]))})</small></h3>{rows}</section>')
    labels = " vs ".join(html.escape(r["label"]) for r in runs)
    note = "" if compare is None or side else (
        '<p class="bad">The compared report covers other texts or clips: only its metrics and curves are shown.</p>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(run['title'])}</title>{_STYLE}</head>
<body>
<h1>{html.escape(run['title'])}</h1>
<p>{run['n_texts']} text queries × {run['n_videos']} videos ({labels}). Ranks are 1-based; ties count against
the model. The correct video has a green border and ✓; a dashed one is the correct video outside the top {top_k}.
Keyframes: {n_keyframes} of the frames the model sees (same frame rule and centre crop).</p>
<h2>Metrics</h2>
{_metrics_table(runs)}{note}
<h2>Recall at K</h2>
<img src="recall_at_k.png" alt="R@K against K, both directions" width="1000">
<h2>Queries</h2>
<p>{len(shown)} of {run['n_texts']}: the {n_worst} worst-ranked for {html.escape(run['label'])} first, then
{len(shown) - n_worst} at random.</p>
{"".join(sections)}
{IMAGE_CHECK_SCRIPT}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ pipeline hooks
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--report*` flags of the pipeline's command line."""
    g = parser.add_argument_group("report (see docs/reproduction.md)")
    g.add_argument("--report", action="store_true",
                   help="after evaluation (and at the end of training) write <output_dir>/report/report.html")
    g.add_argument("--report_compare", help="another run's report (folder or report.json) of the same split, "
                                            "shown side by side (e.g. meanP beside MUSE)")
    g.add_argument("--report_queries", type=_positive_int, default=50, help="text queries shown in the report")
    g.add_argument("--report_top_k", type=_positive_int, default=5, help="retrieved videos shown per query")


def _report_samples(args: argparse.Namespace, model, split: str) -> list:
    """The samples an evaluation of `split` scored, in its order (broken videos dropped as it did)."""
    if getattr(args, "cache_dir", None):
        from .cache import CachedRetrievalDataset

        return CachedRetrievalDataset(args.cache_dir, split).samples
    from .build import frame_config, load_samples, make_tokenizer
    from .data.base import RetrievalDataset

    samples = load_samples(args, split)
    if args.skip_broken_videos:
        samples = RetrievalDataset(samples, make_tokenizer(args.max_words), frame_config(args, model.clip),
                                   skip_broken=True).samples
    return samples


def write_run_report(args: argparse.Namespace, model, split: str, result: Mapping[str, Any],
                     out_dir: str | os.PathLike) -> Path:
    """`--report`: the report of an evaluation `result` (`evaluate_samples` / `evaluate_cache` output, with
    `text`, `video`, `gt`) under `<out_dir>/report`; returns the page. Main process only."""
    from .data.base import group_by_video

    samples = _report_samples(args, model, split)
    clips, gt = group_by_video(samples)
    if len(clips) != result["video"].shape[0] or not torch.equal(gt, result["gt"].cpu()):
        raise RuntimeError(f"the {split} split read for the report ({len(samples)} texts, {len(clips)} clips) is "
                           f"not the one evaluated ({result['text'].shape[0]} texts, {result['video'].shape[0]} clips)")
    frames = {"max_frames": args.max_frames, "feature_framerate": args.feature_framerate,
              "slice_framepos": args.slice_framepos}
    title = f"{args.dataset} {split}: {model.sim_header}" + (f" ({args.init_model})" if args.init_model else "")
    run = report_data(result["text"], result["video"], result["gt"], [s.text for s in samples],
                      [(s.video_id, str(s.video_path), s.start, s.end) for s in clips], label=model.sim_header,
                      title=title, top_k=max(10, args.report_top_k), frames=frames)
    compare = load_report(args.report_compare) if args.report_compare else None
    if compare is not None and compare["label"] == run["label"]:
        compare = {**compare, "label": f"{compare['label']} (compared)"}
    page = build_report(Path(out_dir) / REPORT_DIR, run, compare, n_queries=args.report_queries,
                        top_k=args.report_top_k, seed=args.seed)
    logger.info("report written to %s", page)
    print(f"report: {page}", flush=True)
    return page
