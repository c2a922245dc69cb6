"""Retrieval metrics: R@K, median and mean rank, with a stated tie policy; dual softmax.

Similarity ``sim`` is (N_t, N_v): texts by rows, videos by columns. Text-to-video ranks
each row; video-to-text ranks each column. ``gt`` (N_t,) gives the video of every text
(``None``: square matrix, ground truth on the diagonal).

Tie policy: pessimistic. The rank of a query's match is

    1 + number of non-matching candidates whose score is >= the match's score,

so a tie counts against the model. Why pessimistic: a model that collapses to constant scores
gets rank N (chance would be (N + 1) / 2) instead of a perfect R@1 under the optimistic rule,
and exact float ties are rare in healthy models, so honest results do not change.
CLIP4Clip's ``compute_metrics`` miscounts ties: every candidate tied with the match adds
one more entry to its list of ranks, so a query with k ties is counted k times (changing
the denominator of R@K) at the k positions of the tied block.

Many captions per video (MSVD's test and validation sets, ~41 each; any split where ``gt``
repeats a video):

* text-to-video: every caption is a query, ranked against the N_v distinct videos;
* video-to-text: every video with at least one caption is a query; a hit on ANY of its
  captions counts, so its best-scored caption is the match and its other captions are
  never competitors. The candidates are the other videos' caption sets, each scored by its
  best caption (``competitors="videos"``, CLIP4Clip's multi-sentence evaluation: the
  (N_v, captions, N_v) tensor max-reduced over captions), so ranks lie in [1, N_v] and the
  numbers compare with published ones. ``competitors="texts"`` instead ranks against every
  caption of the other videos (ranks in [1, N_t]); R@1 is the same under both, R@5 / R@10 /
  MdR / MnR are not. ``compute_metrics`` reports the first as ``v2t`` and, when some video
  has several captions, the second as ``v2t_texts``. With one caption per video they agree.

Non-finite similarities (NaN, inf) raise ``ValueError``: a NaN compares false with everything, so
ranking it would give a diverged model a perfect score. R@K and ranks are 1-based, R@K in percent.
Ranks of row blocks can be computed separately (``t2v_ranks`` on chunks of rows) and concatenated:
the result is the same as on the full matrix. Tests: ``tests/examples/test_metrics.py``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

__all__ = [
    "chunked_similarity",
    "compute_metrics",
    "dual_softmax",
    "format_table",
    "metrics_from_ranks",
    "retrieval_metrics",
    "t2v_ranks",
    "V2T_COMPETITORS",
    "v2t_metrics",
    "v2t_ranks",
]

KS = (1, 5, 10)


def _check(sim: Tensor, gt: Tensor | None) -> Tensor:
    if not isinstance(sim, Tensor) or sim.ndim != 2:
        raise ValueError(f"sim must be a (N_t, N_v) tensor, got {getattr(sim, 'shape', type(sim))}")
    n_t, n_v = sim.shape
    finite = torch.isfinite(sim)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        i, j = (int(x) for x in bad[0])
        raise ValueError(
            f"sim holds {bad.shape[0]} non-finite values (NaN or inf; first at text {i}, video {j}: "
            f"{float(sim[i, j])}): the embeddings are not finite, so no ranking is meaningful (a diverged "
            "model or damaged inputs)"
        )
    if gt is None:
        if n_t != n_v:
            raise ValueError(f"sim is {tuple(sim.shape)}: a non-square similarity needs gt (N_t,) video indices")
        return torch.arange(n_t, device=sim.device)
    gt = torch.as_tensor(gt, device=sim.device)
    if gt.shape != (n_t,) or gt.dtype.is_floating_point:
        raise ValueError(f"gt must be ({n_t},) integer video indices, got shape {tuple(gt.shape)} dtype {gt.dtype}")
    if n_t and (gt.min() < 0 or gt.max() >= n_v):
        raise ValueError(f"gt holds video indices outside [0, {n_v}): min {int(gt.min())}, max {int(gt.max())}")
    return gt.long()


def t2v_ranks(sim: Tensor, gt: Tensor | None = None) -> Tensor:
    """1-based pessimistic rank of the matching video for every text.

    Args:
        sim: (N_t, N_v) similarities; may be a block of rows of a larger matrix.
        gt: (N_t,) video index of each row (``None``: the diagonal).

    Returns:
        (N_t,) int64 ranks in [1, N_v].
    """
    gt = _check(sim, gt)
    true = sim.gather(1, gt[:, None])  # (N_t, 1)
    # >= counts the match itself once, so this is 1 + #(other videos scoring >= the match)
    return (sim >= true).sum(dim=1)


V2T_COMPETITORS = ("videos", "texts")


def v2t_ranks(sim: Tensor, gt: Tensor | None = None, competitors: str = "videos", block: int = 1024) -> Tensor:
    """1-based pessimistic rank of the best-scored matching text for every video that has one.

    Args:
        sim: (N_t, N_v) similarities (the full matrix: every text competes for every video).
        gt: (N_t,) video index of each text (``None``: the diagonal).
        competitors: ``"videos"``: each other video (with a text) competes once, with its best-scored
            text (CLIP4Clip's multi-sentence evaluation); ``"texts"``: every text of another video
            competes. Identical when every video has exactly one text.
        block: videos ranked per step with ``"videos"`` (memory: block x N_v scores).

    Returns:
        (N_q,) int64 ranks for the videos with at least one text, in video order.
    """
    gt = _check(sim, gt)
    if competitors not in V2T_COMPETITORS:
        raise ValueError(f"competitors must be one of {V2T_COMPETITORS}, got {competitors!r}")
    n_t, n_v = sim.shape
    has_text = torch.bincount(gt, minlength=n_v) > 0
    simt = sim.t()  # (N_v, N_t)
    ranks = []
    for start in range(0, n_v, block):
        rows = simt[start : start + block]  # (b, N_t)
        own = torch.arange(start, start + rows.shape[0], device=sim.device)  # (b,)
        is_true = gt[None, :] == own[:, None]  # (b, N_t)
        best = rows.masked_fill(~is_true, float("-inf")).amax(dim=1, keepdim=True)  # (b, 1)
        if competitors == "texts":
            ranks.append(1 + ((rows >= best) & ~is_true).sum(dim=1))
            continue
        # group[i, g] = best score of video g's texts for video i: (b, N_v)
        group = rows.new_full((rows.shape[0], n_v), float("-inf"))
        group.scatter_reduce_(1, gt[None, :].expand(rows.shape[0], -1), rows, reduce="amax")
        other = has_text[None, :] & (torch.arange(n_v, device=sim.device)[None, :] != own[:, None])
        ranks.append(1 + ((group >= best) & other).sum(dim=1))
    if not ranks:
        return torch.empty(0, dtype=torch.long, device=sim.device)
    return torch.cat(ranks)[has_text]


def metrics_from_ranks(ranks: Tensor) -> dict[str, float]:
    """R@1/5/10 (%), MdR, MnR (median uses the mean of the two middle ranks, as numpy) and ``n``."""
    if ranks.numel() == 0:
        raise ValueError("no queries: ranks is empty")
    r = ranks.double()
    out = {f"R@{k}": float((r <= k).double().mean() * 100.0) for k in KS}
    out["MdR"] = float(torch.quantile(r, 0.5))
    out["MnR"] = float(r.mean())
    out["n"] = int(r.numel())
    return out


def retrieval_metrics(sim: Tensor, gt: Tensor | None = None) -> dict[str, float]:
    """Text-to-video metrics (ranking each row of ``sim`` (N_t, N_v)); see the module docstring."""
    return metrics_from_ranks(t2v_ranks(sim, gt))


def v2t_metrics(sim: Tensor, gt: Tensor | None = None, competitors: str = "videos") -> dict[str, float]:
    """Video-to-text metrics (ranking each column of ``sim`` (N_t, N_v)); ``competitors`` as ``v2t_ranks``."""
    return metrics_from_ranks(v2t_ranks(sim, gt, competitors))


def compute_metrics(sim: Tensor, gt: Tensor | None = None) -> dict[str, dict[str, float]]:
    """``{"t2v": ..., "v2t": ...}`` for a (N_t, N_v) similarity, plus ``"v2t_texts"`` (every caption a
    candidate) when some video has several texts; see the module docstring."""
    out = {"t2v": retrieval_metrics(sim, gt), "v2t": v2t_metrics(sim, gt)}
    counts = torch.bincount(_check(sim, gt)) if sim.shape[0] else torch.zeros(1, dtype=torch.long)
    if int(counts.max()) > 1:
        out["v2t_texts"] = v2t_metrics(sim, gt, competitors="texts")
    return out


def chunked_similarity(text_emb: Tensor, video_emb: Tensor, chunk_size: int = 4096) -> Tensor:
    """``text_emb @ video_emb.T`` in blocks of ``chunk_size`` texts, gathered on the CPU in float32.

    Args:
        text_emb: (N_t, C) text embeddings (normalise them for cosine similarity).
        video_emb: (N_v, C) video embeddings, on the same device.

    Returns:
        (N_t, N_v) float32 on the CPU.
    """
    if text_emb.ndim != 2 or video_emb.ndim != 2 or text_emb.shape[1] != video_emb.shape[1]:
        raise ValueError(
            f"text_emb (N_t, C) and video_emb (N_v, C) must share C, got {tuple(text_emb.shape)} and "
            f"{tuple(video_emb.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    blocks = [(t @ video_emb.t()).float().cpu() for t in text_emb.split(chunk_size)]
    if not blocks:
        return torch.empty(0, video_emb.shape[0])
    return torch.cat(blocks)


def dual_softmax(sim: Tensor, logit_scale: float = 100.0) -> Tensor:
    """Dual-softmax re-scoring: ``S' = S * softmax(S, dim=0) * N_t`` with ``S = logit_scale * sim``.

    Each video column becomes a distribution over texts, which damps "hub" videos that score
    high for many texts. It needs the whole test set at once, so report it beside (not instead
    of) the plain numbers.

    Args:
        sim: (N_t, N_v) cosine similarities.
        logit_scale: the model's learned (exponentiated) scale, CLIP's 100 at the clamp.

    Returns:
        (N_t, N_v) re-scored similarities (rank them with ``compute_metrics``).
    """
    if sim.ndim != 2:
        raise ValueError(f"sim must be (N_t, N_v), got {tuple(sim.shape)}")
    s = sim.double() * logit_scale
    return (s * torch.softmax(s, dim=0) * s.shape[0]).to(sim.dtype)


def format_table(metrics: Mapping[str, Mapping[str, float]], title: str | None = None) -> str:
    """A fixed-width table, one row per direction (or per name), e.g. ``format_table(compute_metrics(S))``.

    A flat dict of metrics (one direction) is accepted too.
    """
    if metrics and all(not isinstance(v, Mapping) for v in metrics.values()):
        metrics = {"t2v": metrics}
    cols = ["R@1", "R@5", "R@10", "MdR", "MnR"]
    width = max([len(name) for name in metrics] + [9])
    lines = [title] if title else []
    lines.append(f"{'':<{width}}" + "".join(f"{c:>8}" for c in cols) + f"{'n':>8}")
    for name, m in metrics.items():
        cells = "".join(f"{m[c]:>8.1f}" for c in cols)
        lines.append(f"{name:<{width}}{cells}{m.get('n', ''):>8}")
    return "\n".join(lines)
