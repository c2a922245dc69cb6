"""examples/tvr/metrics.py against hand-computed cases, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tvr.metrics import (
    chunked_similarity,
    compute_metrics,
    dual_softmax,
    format_table,
    metrics_from_ranks,
    retrieval_metrics,
    t2v_ranks,
    v2t_ranks,
)


def _clip4clip_compute_metrics(x: np.ndarray) -> dict:
    """CLIP4Clip's metric (metrics.py of the release), to show how it treats ties."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, None]
    ind = np.where(sx - d == 0)[1]
    return {"R1": float(np.sum(ind == 0)) * 100 / len(ind), "n": len(ind)}


def test_hand_computed_without_ties():
    sim = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.5, 0.8], [0.4, 0.45, 0.1]])
    assert t2v_ranks(sim).tolist() == [1, 2, 3]
    assert v2t_ranks(sim).tolist() == [1, 1, 3]
    m = compute_metrics(sim)
    assert m["t2v"] == pytest.approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 2.0, "n": 3})
    assert m["v2t"] == pytest.approx({"R@1": 200 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 5 / 3, "n": 3})


def test_ties_are_pessimistic_and_counted_once():
    sim = torch.tensor([[0.5, 0.5, 0.1], [0.3, 0.3, 0.3], [0.2, 0.7, 0.7]])
    assert t2v_ranks(sim).tolist() == [2, 3, 2]
    m = retrieval_metrics(sim)
    assert m["R@1"] == 0.0 and m["n"] == 3 and m["MnR"] == pytest.approx(7 / 3)
    # CLIP4Clip counts a query once per tied candidate: 7 "queries" and a positive R@1
    ref = _clip4clip_compute_metrics(sim.numpy())
    assert ref["n"] == 7 and ref["R1"] == pytest.approx(300 / 7)


def test_constant_scores_rank_last():
    sim = torch.zeros(5, 5)
    assert t2v_ranks(sim).tolist() == [5] * 5
    assert v2t_ranks(sim).tolist() == [5] * 5
    assert retrieval_metrics(sim)["R@1"] == 0.0


def test_several_texts_per_video():
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.6], [0.3, 0.8], [0.5, 0.5]])
    gt = torch.tensor([0, 0, 1, 1])
    assert t2v_ranks(sim, gt).tolist() == [1, 2, 1, 2]
    assert v2t_ranks(sim, gt).tolist() == [1, 1]
    # two correct texts tied at the top do not push each other down
    sim = torch.tensor([[0.7, 0.2], [0.7, 0.1], [0.1, 0.9]])
    assert v2t_ranks(sim, torch.tensor([0, 0, 1])).tolist() == [1, 1]
    # a video without any text is not a query
    assert v2t_ranks(torch.rand(2, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])).numel() == 2


def _clip4clip_multi_sentence_v2t(sim: np.ndarray, gt: np.ndarray) -> list:
    """CLIP4Clip's multi-sentence video-to-text ranks, re-derived: captions grouped per video into a
    (N_v, max captions, N_v) tensor padded with -inf, max over captions, then each video ranks the groups."""
    n_v = sim.shape[1]
    groups = [sim[gt == v] for v in range(n_v)]
    width = max(len(g) for g in groups)
    padded = np.stack([np.concatenate([g, np.full((width - len(g), n_v), -np.inf)]) for g in groups])
    scores = padded.max(axis=1).T  # (video query, caption group)
    return [int((scores[v] > scores[v, v]).sum()) + 1 for v in range(n_v)]  # no ties in the cases used


MULTI = torch.tensor([
    # v0    v1    v2
    [0.9, 0.1, 0.5],   # t0 -> v0
    [0.8, 0.7, 0.3],   # t1 -> v0
    [0.1, 0.6, 0.4],   # t2 -> v0
    [0.5, 0.65, 0.9],  # t3 -> v1
    [0.2, 0.3, 0.35],  # t4 -> v2
])
MULTI_GT = torch.tensor([0, 0, 0, 1, 2])


def test_many_captions_per_video_hand_computed():
    # text-to-video: every caption is a query over the 3 videos
    assert t2v_ranks(MULTI, MULTI_GT).tolist() == [1, 1, 3, 2, 1]
    # video-to-text, a hit on any own caption: v0's best caption (0.9) beats everything;
    # v1's (t3, 0.65) is beaten by v0's t1 (0.7); v2's (t4, 0.35) by v1's t3 (0.9) and by v0's t0 (0.5)
    # and t2 (0.4): two videos, three captions
    assert v2t_ranks(MULTI, MULTI_GT).tolist() == [1, 2, 3]
    assert v2t_ranks(MULTI, MULTI_GT, competitors="texts").tolist() == [1, 2, 4]
    assert v2t_ranks(MULTI, MULTI_GT).tolist() == _clip4clip_multi_sentence_v2t(MULTI.numpy(), MULTI_GT.numpy())
    m = compute_metrics(MULTI, MULTI_GT)
    assert set(m) == {"t2v", "v2t", "v2t_texts"}
    assert m["t2v"] == pytest.approx({"R@1": 60.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.6, "n": 5})
    assert m["v2t"] == pytest.approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 2.0, "n": 3})
    assert m["v2t_texts"]["MnR"] == pytest.approx(7 / 3) and m["v2t_texts"]["R@1"] == m["v2t"]["R@1"]
    # one caption per video: one v2t row, both definitions agree
    assert set(compute_metrics(MULTI[[0, 3, 4]], torch.tensor([0, 1, 2]))) == {"t2v", "v2t"}
    sim = torch.rand(6, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(v2t_ranks(sim), v2t_ranks(sim, competitors="texts"))


def test_many_captions_ties_blocks_and_random_against_reference():
    # a tie between v0's best caption and v1's best caption counts against v0, once (one competing video)
    sim = torch.tensor([[0.6, 0.0], [0.2, 0.1], [0.6, 0.9], [0.6, 0.8]])
    gt = torch.tensor([0, 0, 1, 1])
    assert v2t_ranks(sim, gt).tolist() == [2, 1]
    assert v2t_ranks(sim, gt, competitors="texts").tolist() == [3, 1]
    # a video without captions is neither a query nor a competitor
    assert v2t_ranks(torch.tensor([[0.5, 0.9, 0.2], [0.3, 0.8, 0.6]]), torch.tensor([0, 2])).tolist() == [1, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        n_v = 7
        gt = torch.cat([torch.arange(n_v), torch.randint(n_v, (20,), generator=g)])
        sim = torch.randn(len(gt), n_v, generator=g)
        want = _clip4clip_multi_sentence_v2t(sim.numpy(), gt.numpy())
        assert v2t_ranks(sim, gt).tolist() == want
        assert v2t_ranks(sim, gt, block=3).tolist() == want  # blocks of video rows give the same ranks
    with pytest.raises(ValueError, match="competitors"):
        v2t_ranks(sim, gt, competitors="captions")


def test_median_of_even_count_is_the_midpoint():
    m = metrics_from_ranks(torch.tensor([1, 2, 3, 40]))
    assert m["MdR"] == 2.5 and m["MnR"] == pytest.approx(11.5)
    assert m["R@1"] == 25.0 and m["R@5"] == 75.0 and m["R@10"] == 75.0


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_chunked_equals_full(chunk):
    g = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=-1)
    video = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=-1)
    full = text @ video.t()
    sim = chunked_similarity(text, video, chunk)
    torch.testing.assert_close(sim, full)
    sim = (sim * 4).round() / 4  # coarse values: many ties
    gt = torch.arange(37)
    ranks = torch.cat([t2v_ranks(rows, g_) for rows, g_ in zip(sim.split(chunk), gt.split(chunk))])
    assert torch.equal(ranks, t2v_ranks(sim))
    assert metrics_from_ranks(ranks) == retrieval_metrics(sim)


def test_dual_softmax_formula_and_hub_suppression():
    sim = torch.tensor([[0.9, 0.2, 0.2], [0.85, 0.8, 0.1], [0.3, 0.1, 0.5]], dtype=torch.float64)
    s = sim * 10
    expected = torch.empty_like(s)
    for j in range(3):
        col = torch.exp(s[:, j]) / torch.exp(s[:, j]).sum()
        expected[:, j] = s[:, j] * col * 3
    torch.testing.assert_close(dual_softmax(sim, logit_scale=10.0), expected)
    # video 0 is a "hub" that steals text 1; re-scoring gives it back
    assert retrieval_metrics(sim)["R@1"] == pytest.approx(200 / 3)
    assert retrieval_metrics(dual_softmax(sim, logit_scale=10.0))["R@1"] == 100.0


def test_bad_input_messages():
    with pytest.raises(ValueError, match="gt"):
        retrieval_metrics(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="gt must be"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="share C"):
        chunked_similarity(torch.zeros(2, 3), torch.zeros(2, 4))


def test_format_table():
    table = format_table(compute_metrics(torch.eye(4)), title="demo")
    lines = table.splitlines()
    assert lines[0] == "demo" and "R@1" in lines[1] and "MnR" in lines[1]
    assert lines[2].startswith("t2v") and "100.0" in lines[2] and lines[3].startswith("v2t")
    assert "100.0" in format_table(retrieval_metrics(torch.eye(3)))
