"""Retrieval report (examples/tvr/report.py): query selection, R@K, the page from a training run and from
`--do_eval`, meanP beside MUSE, and the page in a headless browser (images load, correct video marked)."""

import json

import numpy as np
import pytest
import torch
from tvr.cli import main
from tvr.distributed import DistInfo
from tvr.metrics import metrics_from_ranks
from tvr.report import build_report, load_report, recall_at_k, report_data, select_queries
from tvr.train import train

from tests.examples._pages import assert_images_load, check_page_files
from tests.examples._pipeline_utils import TINY_CLIP, make_tiny_msrvtt, tiny_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_msrvtt(tmp_path_factory.mktemp("data"), n_train=6, n_test=5)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    results = train(tiny_args(data, run, "--epochs", "2", "--report", "--report_queries", "4",
                              "--report_top_k", "3"), DistInfo())
    return run, results


def _check_marks(parsed, n_sections, runs_per_query=1):
    """Every query section marks exactly its correct video, in each run's row."""
    assert len(parsed.sections) == n_sections
    for sec in parsed.sections:
        assert sec["runs"] == runs_per_query
        correct = [f for f in sec["figures"] if f["correct"]]
        assert len(correct) == runs_per_query and all(f["video"] == sec["gt"] for f in correct), sec
        assert all(not f["correct"] for f in sec["figures"] if f["video"] != sec["gt"])


def test_select_queries_worst_first_then_random():
    ranks = [3, 9, 1, 9, 2, 7, 1, 1, 4, 5]
    picked = select_queries(ranks, 6, seed=0)
    assert picked[:3] == [1, 3, 5]  # the worst ranks, ties by index
    assert len(set(picked)) == 6 and not set(picked[3:]) & {1, 3, 5}
    assert select_queries(ranks, 6, seed=0) == picked and select_queries(ranks, 50) != [] and \
        sorted(select_queries(ranks, 50)) == list(range(10))
    with pytest.raises(ValueError, match="worst_fraction"):
        select_queries(ranks, 3, worst_fraction=2.0)


def test_recall_at_k_matches_metrics():
    ranks = torch.tensor([1, 3, 2, 10, 1, 7, 12])
    curve = recall_at_k(ranks.numpy(), 12)
    m = metrics_from_ranks(ranks)
    assert curve[0] == pytest.approx(m["R@1"]) and curve[4] == pytest.approx(m["R@5"])
    assert curve[9] == pytest.approx(m["R@10"]) and curve[-1] == pytest.approx(100.0)
    assert np.all(np.diff(curve) >= 0)


def test_training_run_writes_report_and_curves(trained, data):
    run, results = trained
    page = run / "report" / "report.html"
    parsed = check_page_files(page)
    _check_marks(parsed, n_sections=4)
    assert "recall_at_k.png" in parsed.images and (run / "report" / "recall_at_k.png").stat().st_size > 1000
    rep = load_report(run)
    assert rep["n_texts"] == 5 and rep["n_videos"] == 5
    # the report's ranks reproduce the run's test metrics
    for direction in ("t2v", "v2t"):
        for key in ("R@1", "R@5", "MdR", "MnR"):
            assert rep["metrics"][direction][key] == pytest.approx(results["test"]["metrics"][direction][key])
    # the shown queries: worst-ranked first; the top-k lists hold the stored scores in decreasing order
    shown_gt = [s["gt"] for s in parsed.sections]
    worst = max(range(5), key=lambda q: (rep["t2v_rank"][q], -q))
    assert shown_gt[0] == rep["clips"][rep["gt"][worst]][0]
    assert all(a >= b for row in rep["topk_score"] for a, b in zip(row, row[1:]))
    # curves: a PNG, and the per-step data in results.json (steps 1..N over both epochs, both lr groups)
    assert (run / "curves.png").stat().st_size > 1000
    saved = json.loads((run / "results.json").read_text())
    steps = [s for r in saved["history"] for s in r["curve"]["step"]]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == saved["history"][-1]["step"]
    lr = saved["history"][0]["curve"]["lr"]
    assert set(lr) == {"clip", "head"} and lr["head"][0] == pytest.approx(10 * lr["clip"][0])


def test_report_page_in_browser(trained):
    run, _ = trained
    dom = assert_images_load(run / "report" / "report.html")
    _check_marks(dom, n_sections=4)


def test_eval_report_meanp_beside_muse(trained, data, tmp_path):
    run, _ = trained
    meanp = tmp_path / "meanP"
    assert main("msrvtt", [*_eval_argv(data, meanp), "--sim_header", "meanP", "--report"]) == 0
    muse = tmp_path / "muse"
    assert main("msrvtt", [*_eval_argv(data, muse), "--init_model", str(run / "model_best.pt"), "--report",
                           "--report_compare", str(meanp), "--report_queries", "3"]) == 0
    page = muse / "report" / "report.html"
    parsed = check_page_files(page)
    _check_marks(parsed, n_sections=3, runs_per_query=2)
    text = page.read_text()
    assert "MUSE t2v" in text and "meanP t2v" in text
    assert load_report(meanp)["label"] == "meanP" and load_report(muse / "report" / "report.json")["label"] == "MUSE"


def _eval_argv(data, out):
    return ["--do_eval", "--data_path", str(data.root), "--features_path", str(data.features_path),
            "--output_dir", str(out), "--small_clip", json.dumps(TINY_CLIP),
            "--max_frames", "3", "--max_words", "12", "--batch_size_val", "4", "--num_workers", "0",
            "--no_progress", "--device", "cpu", "--muse_depth", "1", "--muse_d_state", "4"]


def test_missing_video_gets_a_placeholder(tmp_path):
    gen = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    video = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    clips = [(f"v{i}", str(tmp_path / f"v{i}.mp4"), None, None) for i in range(3)]
    run = report_data(text, video, torch.arange(3), ["a", "b", "c"], clips, label="MUSE", top_k=2)
    page = build_report(tmp_path / "rep", run, n_queries=3, top_k=2)
    parsed = check_page_files(page)  # only the R@K plot: no strip without a video
    assert parsed.images == ["recall_at_k.png"] and page.read_text().count("no frames") >= 3
    with pytest.raises(ValueError, match="must match"):
        report_data(text, video, torch.arange(2), ["a", "b", "c"], clips, label="x")
    with pytest.raises(FileNotFoundError, match="--report"):
        load_report(tmp_path / "nothing")


def test_report_command_reads_settings_from_the_checkpoint(trained):
    from tvr.report_cli import main as report_main

    run, results = trained
    assert report_main([str(run / "model_best.pt"), "--no_progress", "--report_queries", "2", "--num_workers", "0"]) == 0
    rep = load_report(run / "eval_test")
    assert rep["metrics"]["t2v"]["R@1"] == pytest.approx(results["test"]["metrics"]["t2v"]["R@1"])
    _check_marks(check_page_files(run / "eval_test" / "report" / "report.html"), n_sections=2)


def test_report_from_feature_cache(data, tmp_path):
    """Training from the cache: keyframes come from the video paths the cache recorded."""
    from tvr.cache import build_cache_from_args

    build_cache_from_args(tiny_args(data, tmp_path / "c", "--cache_dir", str(tmp_path / "cache"), mode="--cache"),
                          DistInfo())
    run = tmp_path / "run"
    results = train(tiny_args(data, run, "--frozen_clip", "--cache_dir", str(tmp_path / "cache"), "--epochs", "1",
                              "--report", "--report_queries", "3"), DistInfo())
    parsed = check_page_files(run / "report" / "report.html")
    _check_marks(parsed, n_sections=3)
    assert len(parsed.images) > 1  # strips, not only the plot
    assert load_report(run)["metrics"]["t2v"]["R@1"] == pytest.approx(results["test"]["metrics"]["t2v"]["R@1"])
