"""Command line (examples/tvr/cli.py): published defaults, CLIP4Clip's flags, modes, entry points."""

import runpy
import sys
from pathlib import Path

import pytest
from tvr.args import RECIPES, build_parser, parse_args
from tvr.cli import entry_point, main

from tests.examples._pipeline_utils import make_tiny_msrvtt

ROOT = Path(__file__).resolve().parents[2]
DATA = ["--data_path", "/data/msrvtt", "--features_path", "/data/msrvtt/videos"]


@pytest.mark.parametrize("dataset,frames,words,batch", [("msrvtt", 12, 32, 128), ("didemo", 64, 64, 64),
                                                         ("activitynet", 64, 64, 64), ("msvd", 12, 32, 128),
                                                         ("lsmdc", 12, 32, 128)])
def test_published_defaults(dataset, frames, words, batch):
    args = parse_args(dataset, ["--do_train", *DATA])
    assert (args.max_frames, args.max_words, args.batch_size) == (frames, words, batch)
    assert (args.epochs, args.lr, args.coef_lr, args.seed) == (5, 1e-4, 1e-3, 42)
    assert (args.feature_framerate, args.slice_framepos, args.warmup_proportion, args.max_grad_norm) == (1, 2, 0.1, 1.0)
    assert args.sim_header == "MUSE" and args.head_lr_mult == 10.0 and args.muse_scales == [0.5, 1.0, 2.0]
    assert args.precision == "fp32" and args.grad_accum == 1 and not args.random_init_clip


def test_clip4clip_msrvtt_command_line_is_accepted():
    # the MSR-VTT line of CLIP4Clip's README (distributed launcher flags aside)
    argv = ("--do_train --num_thread_reader=0 --epochs=5 --batch_size=128 --n_display=50 "
            "--train_csv MSRVTT_train.9k.csv --val_csv MSRVTT_JSFUSION_test.csv --data_path /d/MSRVTT_data.json "
            "--features_path /d/videos --output_dir ckpts/x --lr 1e-4 --max_words 32 --max_frames 12 "
            "--batch_size_val 16 --datatype msrvtt --expand_msrvtt_sentences --feature_framerate 1 --coef_lr 1e-3 "
            "--freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d --sim_header seqTransf "
            "--pretrained_clip_name ViT-B/32 --init_model ckpts/pytorch_model.bin.2 --local_rank 0").split()
    args = parse_args("msrvtt", argv)
    assert args.num_workers == 0 and args.sim_header == "seqTransf" and args.head_lr_mult == 1.0
    assert args.expand_msrvtt_sentences and args.init_model == "ckpts/pytorch_model.bin.2"
    assert parse_args("msrvtt", ["--do_train", *DATA, "--gradient_accumulation_steps", "4"]).grad_accum == 4
    assert parse_args("msrvtt", ["--do_train", *DATA, "--fp16"]).precision == "fp16"


def test_flags_override_recipe_and_muse_options():
    args = parse_args("didemo", ["--do_train", *DATA, "--max_frames", "32", "--muse_scales", "0.25,1,4",
                                 "--muse_aggregation", "frame_wise", "--muse_depth", "2", "--muse_mixer", "attention",
                                 "--head_lr_mult", "5", "--batch_size", "16"])
    assert args.max_frames == 32 and args.max_words == RECIPES["didemo"]["max_words"]
    assert (args.muse_scales, args.muse_aggregation, args.muse_depth, args.muse_mixer) == (
        [0.25, 1.0, 4.0], "frame_wise", 2, "attention")
    assert args.head_lr_mult == 5.0 and args.batch_size == 16


@pytest.mark.parametrize("argv,message", [
    (["--do_train", "--validate", *DATA], "exactly one"),
    ([*DATA], "exactly one"),
    (["--do_train"], "--data_path and --features_path"),
    (["--do_train", *DATA, "--freeze_layer_num", "6"], "freeze_layer_num 6 is not supported"),
    (["--do_train", *DATA, "--muse_mixer", "lstm"], "invalid choice"),
    (["--do_train", *DATA, "--epochs", "0"], "--epochs must be an integer >= 1"),
])
def test_bad_command_lines_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args("msrvtt", argv)
    assert message in capsys.readouterr().err


def test_missing_clip_weights_name_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MUSE_PYRAMID_CLIP_DIR", raising=False)
    data = make_tiny_msrvtt(tmp_path / "data", n_train=2, n_test=2)
    argv = ["--do_eval", "--data_path", str(data.root), "--features_path", str(data.features_path), "--output_dir",
            str(tmp_path / "out"), "--clip_weights_dir", str(tmp_path / "weights"), "--pretrained_clip_name",
            "ViT-B/16", "--device", "cpu"]
    with pytest.raises(FileNotFoundError, match="ViT-B-16.pt"):
        main("msrvtt", argv)


def test_command_line_reports_a_missing_file_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MUSE_PYRAMID_CLIP_DIR", raising=False)
    data = make_tiny_msrvtt(tmp_path / "data", n_train=2, n_test=2)
    argv = ["--do_eval", "--data_path", str(data.root), "--features_path", str(data.features_path), "--output_dir",
            str(tmp_path / "out"), "--clip_weights_dir", str(tmp_path / "weights"), "--device", "cpu"]
    assert entry_point("msrvtt", argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ViT-B-32.pt" in err and "Traceback" not in err


def test_validate_mode_prints_counts(tmp_path, capsys):
    data = make_tiny_msrvtt(tmp_path / "data", n_train=3, n_test=2)
    status = main("msrvtt", ["validate", "--data_path", str(data.root), "--features_path", str(data.features_path)])
    out = capsys.readouterr().out
    assert status == 0
    assert "msrvtt / train" in out and "msrvtt / test" in out and "found" in out
    (data.features_path / "video0.mp4").unlink()
    assert main("msrvtt", ["--validate", "--data_path", str(data.root), "--features_path",
                           str(data.features_path)]) == 1


DATASETS = ["msrvtt", "didemo", "activitynet", "msvd", "lsmdc"]


def _help_by_flag(dataset: str) -> tuple:
    """`--help` as printed, and each flag's entry (its lines joined) keyed by the flag."""
    text = build_parser(dataset).format_help()
    entries: dict = {}
    flag = None
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line.strip()
        elif flag and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return text, entries


@pytest.mark.parametrize("dataset", DATASETS)
def test_help_shows_the_real_defaults(dataset):
    text, lines = _help_by_flag(dataset)
    assert "(default: None)" not in " ".join(text.split()) and "(default: False)" not in text
    for flag in ("--no_val", "--no_test", "--do_train", "--dsl"):
        assert "(default: True)" not in lines[flag] and "(default: False)" not in lines[flag], lines[flag]
    recipe = RECIPES[dataset]
    for key in ("max_words", "max_frames", "batch_size", "epochs", "batch_size_val"):
        assert f"(default: {recipe[key]})" in lines[f"--{key}"], lines[f"--{key}"]
    assert "(default: runs/" in lines["--output_dir"] and "(default: 10 for MUSE" in lines["--head_lr_mult"]
    assert ("--train_csv" in lines) == (dataset == "msrvtt")
    if dataset != "msrvtt":
        assert "MSR-VTT only" in lines["--demo"]


@pytest.mark.parametrize("dataset", ["didemo", "activitynet", "msvd", "lsmdc"])
@pytest.mark.parametrize("flag", ["--train_csv", "--val_csv=x.csv", "--test_csv", "--expand_msrvtt_sentences",
                                  "--no-expand_msrvtt_sentences"])
def test_flags_of_another_data_set_are_rejected_in_one_line(dataset, flag, capsys):
    argv = ["--do_train", *DATA, flag] + (["x.csv"] if flag.endswith("csv") else [])
    with pytest.raises(SystemExit) as exit_info:
        parse_args(dataset, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"{flag.split('=')[0]} does not apply to" in err and "MSR-VTT" in err


def test_datatype_must_match_the_script_and_demo_is_msrvtt_only(capsys):
    assert parse_args("lsmdc", ["--do_train", *DATA, "--datatype", "lsmdc"]).dataset == "lsmdc"
    assert parse_args("activitynet", ["--do_train", *DATA, "--datatype", "activity"]).dataset == "activitynet"
    with pytest.raises(SystemExit):
        parse_args("msvd", ["--do_train", *DATA, "--datatype", "msrvtt"])
    assert "--datatype msrvtt does not match this script" in capsys.readouterr().err
    for dataset in ("didemo", "msvd"):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(dataset, ["--demo"])
        assert exit_info.value.code == 2 and "--demo exists for MSR-VTT only" in capsys.readouterr().err
    assert parse_args("msrvtt", ["--demo"]).demo


def test_demo_refuses_the_flags_it_would_ignore(capsys):
    args = parse_args("msrvtt", ["--demo", "--output_dir", "x", "--seed=3", "--no_progress"])
    assert args.demo and args.seed == 3
    with pytest.raises(SystemExit) as exit_info:
        parse_args("msrvtt", ["--demo", "--lr", "1e4", "--epochs=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--demo runs a fixed recipe" in err and "got --epochs, --lr" in err


def test_do_train_with_do_eval_trains():
    args = parse_args("msvd", ["--do_train", "--do_eval", *DATA])
    assert args.do_train and not args.do_eval
    assert parse_args("msvd", ["--do_eval", *DATA]).do_eval


@pytest.mark.parametrize("dataset", DATASETS)
def test_entry_points_run(dataset, monkeypatch, capsys):
    script = ROOT / "examples" / f"clip4clip_{dataset}.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends its own folder
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"clip4clip_{dataset}.py" in out and "--pretrained_clip_name" in out and "--demo" in out
