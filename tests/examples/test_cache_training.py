"""Training and evaluation from the feature cache equal the online pipeline with CLIP frozen.

Tiny synthetic MSR-VTT, tiny random CLIP, CPU. The cache stores CLIP's outputs in fp16; the online
reference rounds the same outputs through fp16 (token maps and text features) so that both runs see
the same inputs and the comparison is tight. A second test bounds the difference to a plain fp32
online run, which differs only by fp16 storage.
"""

from __future__ import annotations

import json

import pytest
import torch
from tvr.args import parse_args
from tvr.cache import (
    CachedRetrievalDataset,
    CacheMismatchError,
    build_cache_from_args,
    load_manifest,
)
from tvr.cache.training import evaluate_cache
from tvr.checkpoint import CHECKPOINT_NAME, load_checkpoint
from tvr.cli import main
from tvr.distributed import DistInfo
from tvr.evaluate import evaluate_samples, run_eval
from tvr.model import CLIP4Clip
from tvr.runtime import seed_everything
from tvr.train import train

import muse_pyramid.backbones as backbones
from tests.examples._pipeline_utils import TINY_CLIP, make_tiny_msrvtt, tiny_args

pytest.importorskip("open_clip")
pytest.importorskip("safetensors")

EPOCHS = ("--epochs", "2")  # 24 training pairs, batch 4: 12 optimiser steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_msrvtt(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def cache_dir(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    args = tiny_args(data, root / "out", "--cache_dir", str(root / "cache"), "--cache_shard_clips", "5",
                     mode="--cache")
    build_cache_from_args(args, DistInfo())
    return root / "cache"


@pytest.fixture
def fp16_clip_outputs(monkeypatch):
    """Online CLIP outputs rounded through fp16, as the cache stores them."""
    encode_frames, text_features = CLIP4Clip._encode_frames, backbones.open_clip_text_features
    monkeypatch.setattr(CLIP4Clip, "_encode_frames", lambda self, x: encode_frames(self, x).half().float())
    monkeypatch.setattr(backbones, "open_clip_text_features", lambda m, ids: text_features(m, ids).half().float())


def _final_state(out_dir):
    return load_checkpoint(out_dir / CHECKPOINT_NAME)["model"]


def _assert_same_training(a, b, res_a, res_b, rtol, atol, outliers=0.0, outlier_atol=0.0):
    """Same final weights and loss history; with `outliers`, that fraction of the elements of a
    tensor (at least one element) may be off by up to `outlier_atol` instead."""
    assert a.keys() == b.keys()
    for key in a:
        if not outliers or not a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
            continue
        diff = (a[key].double() - b[key].double()).abs()
        off = diff > atol + rtol * b[key].double().abs()
        allowed = max(1, int(outliers * off.numel()))  # a whole element, at least, in a small tensor
        assert int(off.sum()) <= allowed, f"{key}: {int(off.sum())} of {off.numel()} elements differ"
        assert diff.max() <= outlier_atol, f"{key}: max difference {diff.max():.3g}"
    for ha, hb in zip(res_a["history"], res_b["history"]):
        assert ha["step"] == hb["step"]
        assert ha["loss"] == pytest.approx(hb["loss"], rel=rtol, abs=atol)


def test_training_from_cache_equals_online_frozen_clip(data, cache_dir, tmp_path, fp16_clip_outputs):
    online = tiny_args(data, tmp_path / "online", "--frozen_clip", *EPOCHS)
    res_online = train(online, DistInfo())
    cached = tiny_args(data, tmp_path / "cached", "--frozen_clip", "--cache_dir", str(cache_dir), *EPOCHS)
    res_cached = train(cached, DistInfo())
    a, b = _final_state(tmp_path / "online"), _final_state(tmp_path / "cached")
    # CLIP is frozen in both (bit-identical to its initialisation), the logit scale and the head trained
    start = tiny_args(data, tmp_path / "x")
    from tvr.build import build_model_from_args

    seed_everything(start.seed)
    init = build_model_from_args(start).state_dict()
    frozen = [k for k in a if k.startswith("clip.") and k != "clip.logit_scale"]
    assert frozen and all(torch.equal(a[k], init[k]) and torch.equal(b[k], init[k]) for k in frozen)
    assert not torch.equal(a["clip.logit_scale"], init["clip.logit_scale"])
    head = [k for k in a if k.startswith("head.") and a[k].is_floating_point()]
    assert sum(not torch.equal(a[k], init[k]) for k in head) > len(head) // 2
    _assert_same_training(a, b, res_online, res_cached, rtol=1e-4, atol=1e-5)
    assert res_online["test"]["metrics"] == res_cached["test"]["metrics"]
    assert load_checkpoint(tmp_path / "cached" / CHECKPOINT_NAME)["model_config"]["frozen_clip_weights"] == (
        load_manifest(cache_dir)["settings"]["weights"])


def test_training_from_cache_is_within_fp16_of_fp32_online(data, cache_dir, tmp_path):
    online = tiny_args(data, tmp_path / "online", "--frozen_clip", "--epochs", "1")
    res_online = train(online, DistInfo())
    cached = tiny_args(data, tmp_path / "cached", "--frozen_clip", "--cache_dir", str(cache_dir), "--epochs", "1")
    res_cached = train(cached, DistInfo())
    # fp16 storage perturbs the inputs by <= 2^-11 relative; six Adam steps (lr 1e-3) keep weights
    # within 1e-2 relative. Adam normalises each update, so an element whose gradient is near zero
    # may step the other way: a few per thousand may differ by up to 2 lr per step.
    _assert_same_training(_final_state(tmp_path / "online"), _final_state(tmp_path / "cached"), res_online,
                          res_cached, rtol=1e-2, atol=1e-3, outliers=5e-3, outlier_atol=6 * 2 * 1e-3)


def test_evaluation_from_cache_equals_online(data, cache_dir, tmp_path, tolerances):
    from tvr.build import build_model_from_args, frame_config, load_samples, make_tokenizer

    args = tiny_args(data, tmp_path, mode="--do_eval")
    seed_everything(args.seed)  # the CLIP the cache was built with (random-init:<seed>)
    model = build_model_from_args(args).eval()
    info = DistInfo()
    online = evaluate_samples(model, load_samples(args, "test"), make_tokenizer(args.max_words),
                              frame_config(args, model.clip), info, batch_size=4, progress=False, dsl=True)
    cached = evaluate_cache(model, CachedRetrievalDataset(cache_dir, "test"), info, batch_size=4, progress=False,
                            dsl=True)
    rtol, atol = tolerances[torch.float16]["out"]
    torch.testing.assert_close(cached["video"], online["video"], rtol=rtol, atol=atol)
    torch.testing.assert_close(cached["text"], online["text"], rtol=rtol, atol=atol)
    assert cached["metrics"] == online["metrics"] and cached["dsl_metrics"] == online["dsl_metrics"]
    assert (cached["n_texts"], cached["n_videos"]) == (online["n_texts"], online["n_videos"]) == (6, 6)


def test_eval_command_from_cache_checks_the_checkpoint(data, cache_dir, tmp_path):
    cached = tiny_args(data, tmp_path / "run", "--frozen_clip", "--cache_dir", str(cache_dir), "--epochs", "1",
                       "--no_test")
    train(cached, DistInfo())
    ckpt = str(tmp_path / "run" / "model_best.pt")
    from_cache = run_eval(tiny_args(data, tmp_path / "e1", "--init_model", ckpt, "--cache_dir", str(cache_dir),
                                    mode="--do_eval"), DistInfo())
    online = run_eval(tiny_args(data, tmp_path / "e2", "--init_model", ckpt, mode="--do_eval"), DistInfo())
    assert from_cache["metrics"] == online["metrics"]
    # a model whose CLIP was fine-tuned (no frozen_clip_weights record) would read stale token maps: refused
    saved = load_checkpoint(ckpt)
    del saved["model_config"]["frozen_clip_weights"]
    torch.save(saved, tmp_path / "tuned.pt")
    with pytest.raises(CacheMismatchError, match="fine-tuned"):
        run_eval(tiny_args(data, tmp_path / "e3", "--init_model", str(tmp_path / "tuned.pt"),
                           "--cache_dir", str(cache_dir), mode="--do_eval"), DistInfo())


@pytest.mark.parametrize(("flags", "field"), [(("--max_frames", "2"), "max_frames"), (("--seed", "4"), "weights"),
                                              (("--max_words", "10"), "max_words")])
def test_cache_of_other_settings_is_refused(data, cache_dir, tmp_path, flags, field):
    args = tiny_args(data, tmp_path, "--frozen_clip", "--cache_dir", str(cache_dir), *flags)
    with pytest.raises(CacheMismatchError, match=rf"\({field} differ\)"):
        train(args, DistInfo())


def test_cli_cache_mode_and_flag_checks(data, cache_dir, tmp_path, capsys):
    base = ["--data_path", str(data.root), "--features_path", str(data.features_path)]
    with pytest.raises(SystemExit):
        parse_args("msrvtt", ["--do_train", "--cache_dir", str(cache_dir)] + base)  # needs --frozen_clip
    assert "--frozen_clip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args("msrvtt", ["cache"] + base)  # needs --cache_dir
    args = parse_args("msrvtt", ["--do_train", "--frozen_clip", "--cache_dir", str(cache_dir)])
    assert args.data_path is None  # training from a cache needs no data folders
    # the cache command (leading word) on a complete cache: nothing left to write
    before = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.safetensors")}
    argv = ["cache", *base, "--cache_dir", str(cache_dir), "--cache_shard_clips", "5", "--small_clip",
            json.dumps(TINY_CLIP), "--max_frames", "3", "--max_words", "12", "--batch_size_val", "4",
            "--num_workers", "0", "--no_progress", "--device", "cpu", "--seed", "3"]
    assert main("msrvtt", argv) == 0
    assert "to write now: 0 B" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.safetensors")}
