"""The five entry points `examples/clip4clip_<dataset>.py` end to end on fixtures in each data set's exact
format (tests/examples/fixtures.py): validate, train with --do_train --do_eval, resume, the feature cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tvr.args import parse_args
from tvr.cli import main
from tvr.distributed import DistInfo
from tvr.train import train

from tests.examples._pipeline_utils import TINY_CLIP
from tests.examples.fixtures import (
    make_activitynet_fixture,
    make_didemo_fixture,
    make_lsmdc_fixture,
    make_msrvtt_fixture,
    make_msvd_fixture,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = {"msrvtt": make_msrvtt_fixture, "didemo": make_didemo_fixture, "activitynet": make_activitynet_fixture,
            "msvd": make_msvd_fixture, "lsmdc": make_lsmdc_fixture}
#: (a video missing from the training split, global batch fitting the readable training clips,
#:  test texts x test videos after unreadable ones are skipped)
CASES = {"msrvtt": ("video5", 4, (2, 2)), "didemo": ("d@N00_4.m4v", 2, (1, 1)),
         "activitynet": ("v_CCC", 2, (2, 2)), "msvd": ("gone_1_2", 4, (8, 3)),
         "lsmdc": ("0003_Missing_Movie_00.00.01.000-00.00.02.000", 2, (3, 3))}
TINY = ["--small_clip", json.dumps(TINY_CLIP), "--max_frames", "3", "--max_words", "12", "--batch_size_val", "2",
        "--num_workers", "0", "--muse_depth", "1", "--muse_d_state", "4", "--no_progress", "--device", "cpu",
        "--skip_broken_videos", "--coef_lr", "1"]


def _run(dataset: str, argv: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(ROOT / "examples" / f"clip4clip_{dataset}.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(FIXTURES))
def test_script_validates_and_trains_on_its_format(dataset, tmp_path):
    fx = FIXTURES[dataset](tmp_path / "data")
    missing, batch, (n_texts, n_videos) = CASES[dataset]
    data = ["--data_path", str(fx.data_path), "--features_path", str(fx.features_path)]
    proc = _run(dataset, ["validate", *data])
    assert proc.returncode == 1, proc.stderr[-2000:]  # a listed video is not on disk
    assert f"{dataset} / train" in proc.stdout and f"{dataset} / test" in proc.stdout and missing in proc.stdout

    out = tmp_path / "run"
    proc = _run(dataset, ["--do_train", "--do_eval", *data, "--output_dir", str(out), "--epochs", "1",
                          "--batch_size", str(batch), *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 1 and results["history"][0]["step"] >= 1
    test = results["test"]
    assert (test["n_texts"], test["n_videos"]) == (n_texts, n_videos)
    assert ("v2t_texts" in test["metrics"]) == (n_texts > n_videos)  # many captions per video
    assert "t2v" in proc.stdout and "R@1" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["msvd", "lsmdc"])
def test_resume_and_feature_cache(dataset, tmp_path, capsys):
    fx = FIXTURES[dataset](tmp_path / "data")
    data = ["--data_path", str(fx.data_path), "--features_path", str(fx.features_path)]
    run = ["--do_train", *data, "--output_dir", str(tmp_path / "run"), "--batch_size", "2", "--epochs", "2", *TINY]

    def stop_after_first_epoch(epoch, record):
        raise KeyboardInterrupt  # the run is killed once epoch 0's checkpoint is written

    with pytest.raises(KeyboardInterrupt):
        train(parse_args(dataset, run), DistInfo(), on_epoch_end=stop_after_first_epoch)
    assert not (tmp_path / "run" / "results.json").exists()
    assert main(dataset, [*run, "--resume"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [0, 1]

    cache = tmp_path / "cache"
    assert main(dataset, ["cache", *data, "--cache_dir", str(cache), *TINY]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["settings"]["dataset"] == dataset and set(manifest["splits"]) == {"train", "val", "test"}
    assert manifest["splits"]["train"]["skipped_videos"]  # the clip listed but not on disk
    out = tmp_path / "eval"
    assert main(dataset, ["--do_eval", "--cache_dir", str(cache), "--output_dir", str(out), *TINY]) == 0
    online = tmp_path / "eval_online"
    assert main(dataset, ["--do_eval", *data, "--output_dir", str(online), *TINY]) == 0
    cached = json.loads((out / "eval_test.json").read_text())
    direct = json.loads((online / "eval_test.json").read_text())
    assert (cached["n_texts"], cached["n_videos"]) == (direct["n_texts"], direct["n_videos"])
    assert set(cached["metrics"]) == set(direct["metrics"])
