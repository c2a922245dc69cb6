"""Evaluation (examples/tvr/evaluate.py): each clip encoded once, metrics equal the brute-force ones,
DSL beside the plain numbers, and `--do_eval --init_model` reproduces the training run's test numbers."""

import dataclasses
import json

import pytest
import torch
from tvr.build import frame_config, make_tokenizer
from tvr.cli import main
from tvr.data import msrvtt
from tvr.data.base import RetrievalDataset
from tvr.distributed import DistInfo
from tvr.evaluate import evaluate_samples, results_table
from tvr.metrics import compute_metrics
from tvr.train import train

from tests.examples._pipeline_utils import make_tiny_msrvtt, tiny_args, tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_msrvtt(tmp_path_factory.mktemp("data"), n_train=6, n_test=4)


def test_each_clip_encoded_once_and_metrics_match_brute_force(data, tmp_path):
    args = tiny_args(data, tmp_path)
    model = tiny_model("MUSE").eval()
    samples = msrvtt.load_split(data.root, data.features_path, "test")
    samples = samples + [dataclasses.replace(samples[0], text="a second caption of the first clip")]
    tokenize, frames = make_tokenizer(args.max_words), frame_config(args, model.clip)

    encoded = []
    original = model.encode_video

    def counting(video, mask):
        encoded.append(video.shape[0])
        return original(video, mask)

    model.encode_video = counting
    result = evaluate_samples(model, samples, tokenize, frames, DistInfo(), batch_size=3, dsl=True, progress=False)
    assert sum(encoded) == 4 and result["n_videos"] == 4 and result["n_texts"] == 5
    assert result["gt"].tolist() == [0, 1, 2, 3, 0]

    # brute force: every (text, clip) pair through the model, no caching
    ds = RetrievalDataset(samples, tokenize, frames)
    with torch.no_grad():
        items = [ds[i] for i in range(len(ds))]
        text = model.encode_text(torch.stack([it["text_ids"] for it in items]))
        video = original(torch.stack([it["video"] for it in items[:4]]), torch.stack([it["video_mask"] for it in items[:4]]))
    sim = text @ video.t()
    torch.testing.assert_close(result["text"] @ result["video"].t(), sim, rtol=1e-5, atol=1e-5)
    want = compute_metrics(sim, result["gt"])
    assert set(result["metrics"]) == {"t2v", "v2t", "v2t_texts"}  # clip 0 has two captions
    for direction in ("t2v", "v2t", "v2t_texts"):
        for key in ("R@1", "R@5", "MdR", "MnR"):
            assert result["metrics"][direction][key] == pytest.approx(want[direction][key])
    assert set(result["dsl_metrics"]) == {"t2v", "v2t", "v2t_texts"}
    table = results_table(result)
    assert "t2v (DSL)" in table and "\nt2v " in table


def test_do_eval_init_model_reproduces_training_test_numbers(data, tmp_path):
    run = tmp_path / "run"
    results = train(tiny_args(data, run, "--epochs", "1"), DistInfo())
    ev = tmp_path / "eval"
    argv = ["--do_eval", "--init_model", str(run / "model_best.pt"), "--data_path", str(data.root),
            "--features_path", str(data.features_path), "--output_dir", str(ev), "--max_frames", "3",
            "--max_words", "12", "--batch_size_val", "3", "--num_workers", "0", "--no_progress", "--device", "cpu",
            "--dsl"]
    assert main("msrvtt", argv) == 0
    got = json.loads((ev / "eval_test.json").read_text())
    for direction in ("t2v", "v2t"):
        for key, value in results["test"]["metrics"][direction].items():
            assert got["metrics"][direction][key] == pytest.approx(value, abs=1e-6)
    assert "dsl_metrics" in got and (ev / "eval_test.txt").read_text().count("(DSL)") == 2
    emb = torch.load(ev / "embeddings_test.pt", weights_only=True)
    assert emb["video"].shape == (4, 32)
