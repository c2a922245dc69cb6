"""Retrieval metrics: R@K, median and mean rank, with a stated tie policy; dual softmax.

Similarity ``sim`` is (N_t, N_v): texts by rows, videos by columns. Text-to-video ranks
each row; video-to-text ranks each column. ``gt`` (N_t,) gives the video of every text
(``None``: square matrix, ground truth on the diagonal).

Tie policy: pessimistic. The rank of a query's match is

    1 + number of non-matching candidates whose score is >= the match's score,

so a tie counts against the model. With several correct candidates (video-to-text when
a video has several captions) the best-scored correct one counts and the other correct
ones are not competitors. Why pessimistic: a model that collapses to constant scores gets
rank N (chance would be (N + 1) / 2) instead of a perfect R@1 under the optimistic rule,
and exact float ties are rare in healthy models, so honest results do not change.
CLIP4Clip's ``compute_metrics`` miscounts ties: every candidate tied with the match adds
one more entry to its list of ranks, so a query with k ties is counted k times (changing
the denominator of R@K) at the k positions of the tied block.

Non-finite similarities (NaN, inf) raise ``ValueError``: a NaN compares false with everything, so
ranking it would give a diverged model a perfect score. R@K and ranks are 1-based, R@K in percent. Ranks of row blocks can be computed separately
(``t2v_ranks`` on chunks of rows) and concatenated: the result is the same as on the full
matrix. Tests: ``tests/examples/test_metrics.py``.
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


def v2t_ranks(sim: Tensor, gt: Tensor | None = None) -> Tensor:
    """1-based pessimistic rank of the best-scored matching text for every video that has one.

    Args:
        sim: (N_t, N_v) similarities (the full matrix: every text competes for every video).
        gt: (N_t,) video index of each text (``None``: the diagonal).

    Returns:
        (N_q,) int64 ranks for the videos with at least one text, in video order.
    """
    gt = _check(sim, gt)
    n_t, n_v = sim.shape
    simt = sim.t()  # (N_v, N_t)
    is_true = gt[None, :] == torch.arange(n_v, device=sim.device)[:, None]  # (N_v, N_t)
    has_text = is_true.any(dim=1)
    best = simt.masked_fill(~is_true, float("-inf")).amax(dim=1, keepdim=True)  # (N_v, 1)
    ranks = 1 + ((simt >= best) & ~is_true).sum(dim=1)
    return ranks[has_text]


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


def v2t_metrics(sim: Tensor, gt: Tensor | None = None) -> dict[str, float]:
    """Video-to-text metrics (ranking each column of ``sim`` (N_t, N_v))."""
    return metrics_from_ranks(v2t_ranks(sim, gt))


def compute_metrics(sim: Tensor, gt: Tensor | None = None) -> dict[str, dict[str, float]]:
    """``{"t2v": ..., "v2t": ...}`` for a (N_t, N_v) similarity."""
    return {"t2v": retrieval_metrics(sim, gt), "v2t": v2t_metrics(sim, gt)}


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
