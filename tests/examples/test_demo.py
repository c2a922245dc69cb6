"""The CPU demo end to end (examples/tvr/demo.py), reduced but real: it must learn, not only run."""

import pytest
from tvr.checkpoint import CHECKPOINT_NAME
from tvr.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_learns_far_above_chance(tmp_path, capsys):
    cfg = DemoConfig(n_train_videos=36, n_test_videos=12, epochs=2)
    results = run_demo(output_dir=str(tmp_path), seed=0, progress=False, config=cfg)
    t2v, v2t = results["test"]["metrics"]["t2v"], results["test"]["metrics"]["v2t"]
    chance = results["chance_r1"]
    assert chance == 100 / 12
    assert t2v["R@1"] >= 3 * chance, (t2v, chance)
    assert v2t["R@1"] >= 2 * chance, (v2t, chance)
    assert results["history"][-1]["loss"] < results["history"][0]["loss"]
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / CHECKPOINT_NAME).is_file()
    out = capsys.readouterr().out
    assert "R@1" in out and "t2v" in out and "vs chance" in out
