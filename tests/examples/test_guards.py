"""Guards against silent failures: flag ranges, diverged training, NaN metrics, run folders, resume
settings, checkpoint fallback, cache checksums, paths escaping the data folder, one-line CLI errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from tvr.args import RECIPES, build_parser, parse_args
from tvr.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    PREV_NAME,
    CheckpointError,
    load_checkpoint,
    load_training_checkpoint,
    save_atomic,
)
from tvr.cli import entry_point
from tvr.distributed import DistInfo
from tvr.metrics import compute_metrics, t2v_ranks
from tvr.train import NonFiniteError, check_finite_step, train
from tvr.validate_args import NUMERIC_RULES, numeric_dests

from tests.examples._pipeline_utils import make_tiny_msrvtt, tiny_args

DATA = ["--do_train", "--data_path", "/d", "--features_path", "/d/videos"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_msrvtt(tmp_path_factory.mktemp("data"), n_train=8, n_test=4)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------- flag ranges
@pytest.mark.parametrize("dataset", sorted(RECIPES))
def test_every_numeric_flag_has_a_range_rule(dataset):
    dests = numeric_dests(build_parser(dataset))
    assert {"lr", "max_grad_norm", "batch_size", "muse_scales", "seed"} <= set(dests)
    assert set(dests) <= set(NUMERIC_RULES), sorted(set(dests) - set(NUMERIC_RULES))


@pytest.mark.parametrize("flag,value", [
    ("--max_grad_norm", "-1"), ("--max_grad_norm", "0"), ("--max_grad_norm", "inf"), ("--lr", "inf"),
    ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-4"), ("--coef_lr", "-1"), ("--head_lr_mult", "nan"),
    ("--warmup_proportion", "1.5"), ("--warmup_proportion", "-0.1"), ("--muse_dropout", "1"),
    ("--muse_scales", "0.5,-1"), ("--muse_scales", "nan"), ("--num_workers", "-1"), ("--frame_chunk_size", "0"),
    ("--muse_d_state", "0"), ("--seed", "-1"), ("--feature_framerate", "-1"), ("--cache_shard_clips", "0"),
    ("--batch_size_val", "0"), ("--max_words", "2"), ("--max_frames", "-3"), ("--grad_accum", "0"),
])
def test_out_of_range_flags_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args("msrvtt", [*DATA, f"{flag}={value}"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: {flag} must be" in last and "got" in last


def test_edge_values_inside_the_ranges_are_accepted():
    args = parse_args("msrvtt", [*DATA, "--warmup_proportion", "0", "--muse_dropout", "0", "--num_workers", "0",
                                 "--feature_framerate", "0", "--seed", "0", "--lr", "1e-9"])
    assert args.warmup_proportion == 0.0 and args.lr == 1e-9
    assert parse_args("msrvtt", [*DATA, "--warmup_proportion", "1"]).warmup_proportion == 1.0


# ---------------------------------------------------------------------------- non-finite values
def test_metrics_refuse_non_finite_similarities():
    sim = torch.eye(4)
    sim[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*text 2, video 1"):
        compute_metrics(sim)
    with pytest.raises(ValueError, match="non-finite"):
        t2v_ranks(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        compute_metrics(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))


def test_finite_step_check_stops_or_counts_a_scaler_skip():
    info, ok, bad = DistInfo(), torch.tensor(1.0), torch.tensor(float("inf"))
    assert check_finite_step(ok, ok, epoch=0, step=1, info=info) is False
    assert check_finite_step(ok, bad, epoch=0, step=1, info=info, allow_grad_skip=True) is True
    with pytest.raises(NonFiniteError, match=r"step 7 \(epoch 3\).*gradient norm.*--lr.*--max_grad_norm.*fp32"):
        check_finite_step(ok, bad, epoch=2, step=7, info=info)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        check_finite_step(torch.tensor(float("nan")), ok, epoch=0, step=1, info=info, allow_grad_skip=True)


def test_diverged_training_stops_and_writes_nothing(data, tmp_path):
    args = tiny_args(data, tmp_path, "--epochs", "1")
    args.lr = float("inf")  # past the flag check, as a diverging run would be
    with pytest.raises(NonFiniteError, match=r"step 2 \(epoch 1\)") as err:
        train(args, DistInfo())
    assert "--lr" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / CHECKPOINT_NAME).exists() and not (tmp_path / BEST_NAME).exists()


def test_a_diverging_epoch_never_replaces_good_weights(data, tmp_path, monkeypatch):
    val_csv = tmp_path / "val.csv"  # a held-out split: validation selects the best epoch
    val_csv.write_text("\n".join(data.test_csv.read_text().splitlines()[:3]) + "\n")
    out = tmp_path / "run"
    with pytest.raises(_Stop):
        train(tiny_args(data, out, "--epochs", "2", "--val_csv", str(val_csv), argv=["--no_test"]), DistInfo(),
              on_epoch_end=_stop_after_first)
    best, last = (out / BEST_NAME).read_bytes(), (out / CHECKPOINT_NAME).read_bytes()
    import tvr.train as train_module

    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda *a, **k: real_step(*a, **k) * float("nan"))
    args = tiny_args(data, out, "--epochs", "2", "--val_csv", str(val_csv), "--resume", argv=["--no_test"])
    with pytest.raises(NonFiniteError, match=r"step 5 \(epoch 2\): non-finite loss"):
        train(args, DistInfo())
    assert (out / BEST_NAME).read_bytes() == best and (out / CHECKPOINT_NAME).read_bytes() == last


class _Stop(Exception):
    pass


def _stop_after_first(epoch, record):
    if epoch == 0:
        raise _Stop


def test_non_finite_weights_are_never_saved():
    from tvr.train import check_finite_model

    model = torch.nn.Linear(2, 2)
    check_finite_model(model, epoch=0)
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match="epoch 4.*weight bias is not finite"):
        check_finite_model(model, epoch=3)


# ------------------------------------------------------------------------- run folder and resume
def test_a_new_run_does_not_replace_an_old_one(data, tmp_path):
    train(tiny_args(data, tmp_path, "--epochs", "1", argv=["--no_test"]), DistInfo())
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny_args(data, tmp_path, "--epochs", "1", argv=["--no_test"]), DistInfo())
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    train(tiny_args(data, tmp_path, "--epochs", "1", "--seed", "5", "--overwrite", argv=["--no_test"]), DistInfo())
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["run_args"]["seed"] == 5


def test_resume_refuses_changed_settings_unless_allowed(data, tmp_path, caplog):
    extra = ("--epochs", "2")
    with pytest.raises(_Stop):
        train(tiny_args(data, tmp_path, *extra, argv=["--no_test"]), DistInfo(), on_epoch_end=_stop_after_first)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["run_args"]["lr"] == 1e-3 and ckpt["run_args"]["data_path"] == os.path.abspath(data.root)
    changed = tiny_args(data, tmp_path, *extra, "--resume", "--lr", "2e-3", "--batch_size", "2",
                        argv=["--no_test"])
    with pytest.raises(ValueError, match=r"--lr \(optimisation\): checkpoint 0.001, now 0.002") as err:
        train(changed, DistInfo())
    assert "--batch_size (optimisation): checkpoint 4, now 2" in str(err.value)
    assert "--allow_changed_args" in str(err.value) and "--seed" not in str(err.value)
    changed.allow_changed_args = True
    with caplog.at_level(logging.WARNING, logger="tvr.run_guard"):
        result = train(changed, DistInfo())
    assert len(result["history"]) == 2 and "changed settings" in caplog.text


def test_checkpoints_rotate_and_a_damaged_latest_falls_back(tmp_path, caplog):
    path = tmp_path / CHECKPOINT_NAME
    state = {k: {} for k in ("model", "optimizer", "scheduler", "scaler")}
    for epoch in range(3):
        save_atomic({**state, "rng": [], "epoch": epoch, "step": epoch}, path, keep_previous=tmp_path / PREV_NAME)
    assert load_checkpoint(path)["epoch"] == 2 and load_checkpoint(tmp_path / PREV_NAME)["epoch"] == 1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="tvr.checkpoint"):
        ckpt, used = load_training_checkpoint(path)
    assert used == tmp_path / PREV_NAME and ckpt["epoch"] == 1
    assert "falling back" in caplog.text and CHECKPOINT_NAME in caplog.text
    with pytest.raises(CheckpointError, match=f"{PREV_NAME}.*not a training checkpoint"):
        save_atomic({"model": {}}, tmp_path / PREV_NAME)
        load_training_checkpoint(path)


def test_resume_falls_back_after_a_truncated_checkpoint(data, tmp_path):
    train(tiny_args(data, tmp_path, "--epochs", "2", argv=["--no_test"]), DistInfo())
    assert load_checkpoint(tmp_path / PREV_NAME)["epoch"] == 0
    raw = (tmp_path / CHECKPOINT_NAME).read_bytes()
    (tmp_path / CHECKPOINT_NAME).write_bytes(raw[:1000])
    result = train(tiny_args(data, tmp_path, "--epochs", "2", "--resume", argv=["--no_test"]), DistInfo())
    assert [h["epoch"] for h in result["history"]] == [0, 1] and load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1


def test_resume_from_the_best_weights_is_an_error_not_a_fallback(data, tmp_path):
    """`--resume run/model_best.pt` (a slip) must not silently resume from checkpoint_prev.pt."""
    from tvr.checkpoint import BEST_NAME, load_training_checkpoint

    train(tiny_args(data, tmp_path, "--epochs", "2", argv=["--no_test"]), DistInfo())
    assert (tmp_path / PREV_NAME).is_file() and (tmp_path / BEST_NAME).is_file()
    with pytest.raises(CheckpointError, match="model_best.pt is not a training checkpoint"):
        load_training_checkpoint(tmp_path / BEST_NAME)
    assert load_training_checkpoint(tmp_path / CHECKPOINT_NAME)[0]["epoch"] == 1


def test_resume_from_the_wrong_kind_of_file_is_named(data, tmp_path):
    torch.save({"model": {}, "epoch": 0}, tmp_path / "weights.pt")
    args = tiny_args(data, tmp_path / "run", "--resume", str(tmp_path / "weights.pt"))
    with pytest.raises(CheckpointError, match="weights.pt is not a training checkpoint"):
        train(args, DistInfo())


# ------------------------------------------------------------------------ paths inside the folder
def test_msrvtt_ids_outside_the_video_folder_are_refused(data, tmp_path):
    from tvr.data import msrvtt

    root = tmp_path / "copy"
    shutil.copytree(data.root, root)
    shutil.copy(root / "videos" / "video0.mp4", root / "secret.mp4")  # outside features_path
    test_csv = root / "MSRVTT_JSFUSION_test.csv"
    rows = test_csv.read_text().splitlines()
    rows.append(f"k1,v1,../secret,a leak\nk2,v2,{root / 'secret'},an absolute leak\nk3,v3,..,the folder above")
    test_csv.write_text("\n".join(rows) + "\n")
    report = msrvtt.scan(root, root / "videos", "test")
    assert len(report.refused) == 3 and all("outside" in r for r in report.refused)
    assert all("secret" not in str(s.video_path) and s.video_path.resolve().is_relative_to((root / "videos").resolve())
               for s in report.samples)
    assert report.as_dict()["refused"] == 3


def test_didemo_and_activitynet_names_outside_the_folder_are_refused(tmp_path):
    from tvr.data import activitynet, didemo

    from tests.examples.fixtures import make_activitynet_fixture, make_didemo_fixture

    fx = make_didemo_fixture(tmp_path / "didemo")
    (fx.data_path / "secret.mp4").write_bytes(b"x")
    listed = (fx.data_path / "val_list.txt").read_text() + "../secret.mp4\n/etc/passwd\n"
    (fx.data_path / "val_list.txt").write_text(listed)
    ann = json.loads((fx.data_path / "val_data.json").read_text())
    ann += [{"video": "../secret.mp4", "description": "leak"}, {"video": "/etc/passwd", "description": "leak"}]
    (fx.data_path / "val_data.json").write_text(json.dumps(ann))
    report = didemo.scan(fx.data_path, fx.features_path, "val")
    assert len(report.refused) == 2 and [s.video_id for s in report.samples] == ["h@N00_8.mp4"]

    fx = make_activitynet_fixture(tmp_path / "anet")
    ids = json.loads((fx.data_path / "val_ids.json").read_text()) + ["../../x", "v_/etc/y"]
    (fx.data_path / "val_ids.json").write_text(json.dumps(ids))
    ann = json.loads((fx.data_path / "val_1.json").read_text())
    ann.update({v: {"duration": 1.0, "sentences": ["leak"]} for v in ids[-2:]})
    (fx.data_path / "val_1.json").write_text(json.dumps(ann))
    report = activitynet.scan(fx.data_path, fx.features_path, "val")
    assert len(report.refused) == 2 and sorted(s.video_id for s in report.samples) == ["v_EEE", "v_FFF"]
    assert all(Path(s.video_path).resolve().is_relative_to(fx.features_path.resolve()) for s in report.samples)


# ----------------------------------------------------------------------------- one-line errors
def test_malformed_annotation_json_is_one_line_naming_the_file(data, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(data.root, root)
    (root / "MSRVTT_data.json").write_text('{"sentences": [{"video_id": "video0", "caption": ')
    status = entry_point("msrvtt", ["validate", "--data_path", str(root), "--features_path", str(root / "videos")])
    assert status == 2
    _one_line_error(capsys, "MSRVTT_data.json", "not valid JSON")
    (root / "MSRVTT_data.json").write_text('{"sentences": [{"caption": "no id"}]}')
    assert entry_point("msrvtt", ["validate", "--data_path", str(root), "--features_path", str(root / "videos")]) == 2
    _one_line_error(capsys, "MSRVTT_data.json", "'video_id'")


@pytest.mark.parametrize("content", ["tensor", "json", "truncated"])
def test_init_model_of_the_wrong_kind_is_one_line_naming_the_file(data, tmp_path, capsys, content):
    path = tmp_path / "model.bin"
    if content == "tensor":
        torch.save(torch.ones(3), path)
    elif content == "json":
        path.write_text('{"not": "a checkpoint"}')
    else:
        torch.save({"clip.visual.proj": torch.ones(64, 32), "MS_mamba.0.mamba.D": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:3000])
    argv = ["--do_eval", "--data_path", str(data.root), "--features_path", str(data.features_path), "--init_model",
            str(path), "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress"]
    assert entry_point("msrvtt", argv) == 2
    _one_line_error(capsys, str(path))


def test_debug_log_level_shows_the_traceback(data, tmp_path, capsys):
    (tmp_path / "model.bin").write_text("junk")
    argv = ["--do_eval", "--data_path", str(data.root), "--features_path", str(data.features_path), "--init_model",
            str(tmp_path / "model.bin"), "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--log_level",
            "DEBUG"]
    try:
        assert entry_point("msrvtt", argv) == 2
    finally:
        logging.getLogger().setLevel(logging.WARNING)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_truncated_release_checkpoint_names_the_file(tmp_path):
    from muse_pyramid import MUSEHead, load_release_checkpoint

    head = MUSEHead(32, depth=1)
    path = tmp_path / "pytorch_model.bin.2"
    torch.save({f"MS_mamba.0.{k}": v for k, v in head.blocks[0].state_dict().items()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="pytorch_model.bin.2.*truncated"):
        load_release_checkpoint(head, path)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_release_checkpoint(head, tmp_path / "missing.bin")


# ------------------------------------------------------------------------------------- cache
@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    """A small cache of the tiny data's test split, and a pristine copy of its bytes."""
    from tvr.data import msrvtt

    from tests.examples.test_cache import write

    root = tmp_path_factory.mktemp("cache")
    write(root, {"test": msrvtt.load_split(data.root, data.features_path, "test")})
    return root


def _fresh_cache(cache, tmp_path):
    target = tmp_path / "cache"
    shutil.copytree(cache, target)
    return target


def test_cache_records_checksums_and_rewrites_a_flipped_shard(data, cache, tmp_path):
    from tvr.cache import CachedRetrievalDataset, load_manifest
    from tvr.cache.format import CacheShardError, read_header, sha256_file
    from tvr.data import msrvtt

    from tests.examples.test_cache import write

    root = _fresh_cache(cache, tmp_path)
    entry = load_manifest(root)["splits"]["test"]
    shard = root / "test" / entry["video_shards"][0]["name"]
    assert entry["video_shards"][0]["sha256"] == sha256_file(shard)
    good = shard.read_bytes()
    start = read_header(shard)[1]
    shard.write_bytes(good[: start + 5] + bytes([good[start + 5] ^ 0xFF]) + good[start + 6 :])  # same size
    CachedRetrievalDataset(root, "test")  # reading does not hash unless asked
    with pytest.raises(CacheShardError, match=f"{shard.name} is damaged.*sha256"):
        CachedRetrievalDataset(root, "test", verify=True)
    written = []
    write(root, {"test": msrvtt.load_split(data.root, data.features_path, "test")},
          on_shard=lambda *a: written.append(a))
    assert written == [("test", "videos", 0)] and shard.read_bytes() == good
    CachedRetrievalDataset(root, "test", verify=True)


def test_a_damaged_shard_header_names_the_shard(cache, tmp_path):
    from tvr.cache import CachedRetrievalDataset
    from tvr.cache.format import CacheShardError

    root = _fresh_cache(cache, tmp_path)
    shard = sorted((root / "test").glob("videos-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes().replace(b"data_offsets", b"data_offsetz", 1))
    ds = CachedRetrievalDataset(root, "test")
    with pytest.raises(CacheShardError, match=f"{shard.name} is damaged.*data_offsets"):
        ds[0]


def test_temporary_names_are_unique_per_writer(tmp_path):
    from tvr.cache.format import write_json_atomic, write_safetensors

    other = tmp_path / ".shard.safetensors.tmp"  # another writer's file, in the middle of its write
    other.write_bytes(b"their half shard")
    write_safetensors(tmp_path / "shard.safetensors", {"x": torch.ones(3)})
    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert other.read_bytes() == b"their half shard"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shard.safetensors.tmp", "manifest.json",
                                                          "shard.safetensors"]


def test_a_damaged_manifest_entry_names_the_manifest(cache, tmp_path):
    from tvr.cache import CachedRetrievalDataset

    root = _fresh_cache(cache, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["test"]["video_shards"] = 3
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json is damaged: split 'test' field 'video_shards'"):
        CachedRetrievalDataset(root, "test")


@pytest.mark.parametrize("damage", ["syntax", "list"])
def test_an_invalid_manifest_is_one_line_naming_it(cache, tmp_path, capsys, damage):
    root = _fresh_cache(cache, tmp_path)
    (root / "manifest.json").write_text({"syntax": "{not json", "list": "[1, 2]"}[damage])
    argv = ["--do_eval", "--cache_dir", str(root), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
            "--small_clip", json.dumps({"embed_dim": 32, "image_size": 32, "patch_size": 16, "vision_width": 64,
                                        "vision_layers": 1, "text_width": 64, "text_layers": 1, "context_length": 8}),
            "--max_words", "8", "--max_frames", "4", "--muse_depth", "1", "--no_progress"]
    assert entry_point("msrvtt", argv) == 2
    _one_line_error(capsys, "manifest.json")
