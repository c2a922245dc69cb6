"""Checkpoints (examples/tvr/checkpoint.py): atomic, weights_only, and an interrupted run resumes exactly."""

import random

import numpy as np
import pytest
import torch
from tvr.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_atomic,
)
from tvr.distributed import DistInfo
from tvr.train import train

from tests.examples._pipeline_utils import make_tiny_msrvtt, tiny_args


class _Killed(Exception):
    pass


def _kill_after(epoch_to_kill):
    def hook(epoch, record):
        if epoch == epoch_to_kill:
            raise _Killed(f"killed after epoch {epoch}")

    return hook


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_msrvtt(tmp_path_factory.mktemp("data"), n_train=8, n_test=4)


def test_interrupted_run_resumes_to_identical_weights(data, tmp_path):
    # dropout on (MUSE default 0.1) and one random caption per video per epoch: both draw from the RNG
    extra = ("--epochs", "2", "--no-expand_msrvtt_sentences", "--grad_accum", "2")
    full = train(tiny_args(data, tmp_path / "full", *extra), DistInfo())
    with pytest.raises(_Killed):
        train(tiny_args(data, tmp_path / "cut", *extra), DistInfo(), on_epoch_end=_kill_after(0))
    ckpt = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 2
    resumed = train(tiny_args(data, tmp_path / "cut", *extra, "--resume"), DistInfo())

    want = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    got = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    assert got["epoch"] == want["epoch"] == 1 and got["step"] == want["step"] == 4
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    for a, b in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)
    assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["test"]["metrics"] == full["test"]["metrics"]


def test_checkpoint_contents_load_weights_only(data, tmp_path):
    train(tiny_args(data, tmp_path, "--epochs", "1"), DistInfo())
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "model_config", "args"):
        assert key in ckpt, key
    assert ckpt["model_config"]["sim_header"] == "MUSE" and ckpt["model_config"]["muse"]["depth"] == 1
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert ckpt["args"]["batch_size"] == 4
    best = torch.load(tmp_path / BEST_NAME, weights_only=True)
    assert best["model"].keys() == ckpt["model"].keys()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_rng_state_round_trip():
    state = capture_rng_state()
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws


def test_save_atomic_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 1, "w": torch.ones(2)}, path)
    with pytest.raises(TypeError, match="weights_only"):
        save_atomic({"step": 2, "bad": object()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
