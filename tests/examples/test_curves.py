"""Training curves (examples/tvr/curves.py): smoothing, per-step learning rates of both groups, curves kept
through a resume, the PNG, and the optional TensorBoard logging."""

import json
import math
import sys

import pytest
import torch
from tvr.curves import TrainingCurves, plot_curves, smooth
from tvr.distributed import DistInfo
from tvr.optim import build_optimizer
from tvr.train import train

from tests.examples._pipeline_utils import make_tiny_msrvtt, tiny_args, tiny_model


def test_smooth_keeps_constants_follows_steps_and_skips_nan():
    assert smooth([2.0] * 50, 0.9) == pytest.approx([2.0] * 50)
    s = smooth([0.0] * 20 + [1.0] * 200, 0.9)
    assert s[19] == 0.0 and 0.0 < s[25] < 1.0 and s[-1] == pytest.approx(1.0, abs=1e-6)
    s = smooth([1.0, float("nan"), 3.0], 0.5)
    assert s[1] == pytest.approx(1.0) and math.isfinite(s[2]) and 1.0 < s[2] < 3.0
    with pytest.raises(ValueError, match="weight"):
        smooth([1.0], 1.0)


def test_curves_record_both_groups_learning_rates(tmp_path):
    model = tiny_model("MUSE")
    opt = build_optimizer(model, lr=1e-3, coef_lr=0.01, head_lr_mult=10)
    curves = TrainingCurves(opt, tmp_path)
    for step in (1, 2):
        curves.step(step, torch.tensor(float(step)))
    curve = curves.end_epoch({"epoch": 0})
    assert curve == {"step": [1, 2], "loss": [1.0, 2.0], "lr": {"clip": [1e-5, 1e-5], "head": [1e-2, 1e-2]}}
    assert curves.end_epoch({"epoch": 1})["step"] == []  # reset after every epoch
    history = [{"epoch": 0, "curve": curve, "val": {"t2v": {"R@1": 10.0}, "v2t": {"R@1": 5.0}}}]
    png = plot_curves(history, tmp_path / "c.png", test={"metrics": {"t2v": {"R@1": 9.0}, "v2t": {"R@1": 4.0}}})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_run_keeps_its_curves(tmp_path):
    data = make_tiny_msrvtt(tmp_path / "data", n_train=6, n_test=3)
    run = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(epoch, record):
        raise Stop

    with pytest.raises(Stop):
        train(tiny_args(data, run, "--epochs", "2"), DistInfo(), on_epoch_end=stop)
    assert (run / "curves.png").is_file() and not (run / "results.json").exists()
    results = train(tiny_args(data, run, "--epochs", "2", "--resume"), DistInfo())
    steps = [s for r in results["history"] for s in r["curve"]["step"]]
    assert steps == list(range(1, results["history"][-1]["step"] + 1)) and len(results["history"]) == 2
    saved = json.loads((run / "results.json").read_text())
    assert [r["curve"]["loss"] for r in saved["history"]] == [r["curve"]["loss"] for r in results["history"]]


def test_no_test_run_still_writes_results_json(tmp_path):
    data = make_tiny_msrvtt(tmp_path / "data", n_train=6, n_test=3)
    train(tiny_args(data, tmp_path / "run", "--epochs", "1", "--no_test"), DistInfo())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"] is None and saved["history"][0]["curve"]["step"]
    assert (tmp_path / "run" / "curves.png").is_file()


def test_tensorboard_flag_needs_the_package(tmp_path, monkeypatch):
    model = tiny_model("meanP")
    opt = build_optimizer(model, lr=1e-3, coef_lr=1, head_lr_mult=1)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'muse-pyramid\[tensorboard\]'"):
        TrainingCurves(opt, tmp_path, tensorboard=True)
    TrainingCurves(opt, tmp_path, tensorboard=True, is_main=False)  # other processes never open it


def test_tensorboard_logs_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    model = tiny_model("meanP")
    opt = build_optimizer(model, lr=1e-3, coef_lr=1, head_lr_mult=1)
    curves = TrainingCurves(opt, tmp_path, tensorboard=True)
    curves.step(1, 0.5)
    curves.end_epoch({"epoch": 0, "step": 1, "val": {"t2v": {"R@1": 1.0}}})
    curves.finish({"history": [], "test": None})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
