"""Video search (examples/tvr/search_index.py, examples/search.py): the index holds exactly the embeddings
the evaluation computes, grows incrementally, refuses another model, searches with CLIP alone, writes a
results page whose images load; a trained demo model finds the captioned video in its top 5."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tvr.build import frame_config, make_tokenizer
from tvr.data import msrvtt
from tvr.distributed import DistInfo
from tvr.evaluate import evaluate_samples
from tvr.search_cli import entry_point, main
from tvr.search_index import (
    ExactCosine,
    VideoIndex,
    bytes_per_video,
    encode_queries,
    load_search_model,
)
from tvr.train import train

from tests.examples._pages import assert_images_load, check_page_files
from tests.examples._pipeline_utils import make_tiny_msrvtt, tiny_args, tiny_clip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny trained checkpoint and a folder holding only the test split's videos."""
    root = tmp_path_factory.mktemp("search")
    data = make_tiny_msrvtt(root / "data", n_train=6, n_test=5)
    args = tiny_args(data, root / "run", "--epochs", "1")
    train(args, DistInfo())
    samples = msrvtt.load_split(data.root, data.features_path, "test")
    videos = root / "videos"
    videos.mkdir()
    for s in samples:
        shutil.copy2(s.video_path, videos / s.video_path.name)
    return {"data": data, "args": args, "ckpt": root / "run" / "model_best.pt", "videos": videos, "samples": samples}


def _copy_videos(setup, dst: Path) -> Path:
    shutil.copytree(setup["videos"], dst)
    return dst


def test_index_equals_evaluation_embeddings_and_search_ranks(setup, tmp_path):
    model, source = load_search_model(str(setup["ckpt"]))
    assert (source.sim_header, source.max_frames, source.max_words, source.image_resolution) == ("MUSE", 3, 12, 16)
    index = VideoIndex.open(tmp_path / "ix")
    counts = index.update(setup["videos"], model, source, batch_size=2, progress=False)
    assert counts["added"] == 5 and counts["failed"] == 0 and len(index) == 5
    result = evaluate_samples(model, setup["samples"], make_tokenizer(12), frame_config(setup["args"], model.clip),
                              DistInfo(), batch_size=4, progress=False)
    by_name = {Path(e.path).name: i for i, e in enumerate(index.entries)}
    order = [by_name[s.video_path.name] for s in setup["samples"]]
    torch.testing.assert_close(index.vectors[order], result["video"], rtol=1e-5, atol=1e-5)
    # searching each caption ranks the videos exactly as the evaluation's similarity does
    queries = encode_queries(model, source, [s.text for s in setup["samples"]])
    torch.testing.assert_close(queries, result["text"], rtol=1e-5, atol=1e-5)
    hits = index.search(queries, k=5)
    sim = result["text"] @ result["video"].t()
    for q, row in enumerate(hits):
        want = [setup["samples"][j].video_path.name for j in sim[q].argsort(descending=True).tolist()]
        assert [Path(e.path).name for e, _ in row] == want
        assert [s for _, s in row] == pytest.approx(sorted(sim[q].tolist(), reverse=True), abs=1e-5)
    # stored: entries with duration and checksum, (N, D) float32 embeddings, thumbnails
    again = VideoIndex.open(tmp_path / "ix", must_exist=True)
    assert np.load(tmp_path / "ix" / "embeddings.npy").shape == (5, 32)
    e = again.entries[0]
    assert e.checksum.startswith("sha256:") and e.duration == pytest.approx(3.0, abs=0.6) and e.n_frames == 3
    assert (tmp_path / "ix" / e.thumb).is_file() and again.memory_bytes == 5 * bytes_per_video(32)


def test_incremental_update(setup, tmp_path):
    videos = _copy_videos(setup, tmp_path / "videos")
    model, source = load_search_model(str(setup["ckpt"]))
    index = VideoIndex.open(tmp_path / "ix")
    decoded = []
    index.update(videos, model, source, progress=False, on_decode=decoded.append)
    assert len(decoded) == 5
    first = {Path(e.path).name: index.vectors[i].clone() for i, e in enumerate(index.entries)}
    names = sorted(first)

    decoded.clear()  # nothing new: nothing decoded
    counts = index.update(videos, model, source, progress=False, on_decode=decoded.append)
    assert decoded == [] and counts["unchanged"] == 5 and counts["added"] == 0

    shutil.copy2(setup["data"].features_path / "video0.mp4", videos / "new.mp4")  # a new file
    (videos / names[0]).rename(videos / "sub_moved.mp4")  # moved: same bytes, new name
    (videos / names[1]).unlink()  # removed
    (videos / names[2]).write_bytes((setup["data"].features_path / "video1.mp4").read_bytes())  # changed
    shutil.copy2(videos / names[3], videos / "dup.mp4")  # a duplicate of an indexed file
    counts = index.update(videos, model, source, progress=False, on_decode=decoded.append)
    assert sorted(Path(p).name for p in decoded) == sorted(["new.mp4", names[2]])
    assert (counts["added"], counts["changed"], counts["moved"], counts["removed"]) == (2, 1, 1, 1)
    assert len(index) == 6 and len({e.path for e in index.entries}) == 6
    vec = {Path(e.path).name: index.vectors[i] for i, e in enumerate(index.entries)}
    torch.testing.assert_close(vec["sub_moved.mp4"], first[names[0]])
    torch.testing.assert_close(vec["dup.mp4"], first[names[3]])
    assert not torch.allclose(vec[names[2]], first[names[2]])

    (videos / "broken.mp4").write_bytes(b"not a video")
    counts = index.update(videos, model, source, progress=False)
    assert counts["failed"] == 1 and "broken.mp4" in next(iter(counts["failures"])) and len(index) == 6
    reopened = VideoIndex.open(tmp_path / "ix")
    assert len(reopened) == 6 and list(reopened.failed) == [str((videos / "broken.mp4").resolve())]


def test_index_refuses_another_model_and_a_changed_checkpoint(setup, tmp_path):
    model, source = load_search_model(str(setup["ckpt"]))
    index = VideoIndex.open(tmp_path / "ix")
    index.update(setup["videos"], model, source, progress=False)
    other, other_source = load_search_model(str(setup["ckpt"]), max_frames=2)
    with pytest.raises(ValueError, match="max_frames"):
        index.update(setup["videos"], other, other_source, progress=False)
    assert index.update(setup["videos"], other, other_source, progress=False, rebuild=True)["added"] == 5
    ckpt = tmp_path / "copy.pt"
    shutil.copy2(setup["ckpt"], ckpt)
    _, src = load_search_model(str(ckpt))
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="changed since the index was built"):
        load_search_model(str(ckpt), expect_sha256=src.sha256)


def test_clip_alone_meanp_baseline(setup, tmp_path):
    weights = tmp_path / "clip.pt"
    torch.save(tiny_clip(seed=5).state_dict(), weights)
    assert main(["index", str(setup["videos"]), "--clip", str(weights), "--index", str(tmp_path / "ix"),
                 "--max_frames", "3", "--num_workers", "0", "--no_progress"]) == 0
    index = VideoIndex.open(tmp_path / "ix")
    assert index.model["source"] == "clip" and index.model["sim_header"] == "meanP" and len(index) == 5
    assert index.model["max_words"] == 16  # the recipe's 32, capped at this CLIP's context length
    model, source = load_search_model(clip=str(weights), max_frames=3)
    hits = index.search(encode_queries(model, source, ["a red square"]), k=3)[0]
    assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1]


def test_cli_index_search_and_results_page(setup, tmp_path, capsys):
    ix = tmp_path / "ix"
    query = setup["samples"][0].text
    assert main(["search", query, "a blue shape", "--videos", str(setup["videos"]), "--checkpoint",
                 str(setup["ckpt"]), "--index", str(ix), "--top_k", "3", "--html", "--num_workers", "0",
                 "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "5 added" in out and "MB per 10,000 videos" in out and f'"{query}" (5 videos, MUSE)' in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]) == 6
    page = ix / "search.html"
    parsed = check_page_files(page)
    assert len(parsed.hits) == 6 and len(parsed.images) == 6
    # the model is read back from the index: no --checkpoint needed to search again
    assert main(["search", query, "--index", str(ix), "--top_k", "5", "--html", str(tmp_path / "p" / "r.html")]) == 0
    assert "1 " in capsys.readouterr().out
    parsed = check_page_files(tmp_path / "p" / "r.html")
    assert {Path(h["path"]).name for h in parsed.hits} == {s.video_path.name for s in setup["samples"]}
    assert entry_point(["search", "x", "--index", str(tmp_path / "none")]) == 2
    assert "no video index" in capsys.readouterr().err


def test_results_page_in_browser(setup, tmp_path):
    ix = tmp_path / "ix"
    assert main(["search", setup["samples"][1].text, "--videos", str(setup["videos"]), "--checkpoint",
                 str(setup["ckpt"]), "--index", str(ix), "--top_k", "5", "--html", "--num_workers", "0",
                 "--no_progress"]) == 0
    dom = assert_images_load(ix / "search.html")
    assert len(dom.hits) == 5 and {Path(h["path"]).name for h in dom.hits} == {
        s.video_path.name for s in setup["samples"]}


def test_exact_cosine_backend():
    vectors = torch.nn.functional.normalize(torch.randn(7, 4), dim=-1)
    scores, rows = ExactCosine(vectors).search(vectors[[2, 5]], k=3)
    assert rows[:, 0].tolist() == [2, 5] and scores[:, 0].tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match=r"queries must be \(Q, 4\)"):
        ExactCosine(vectors).search(torch.randn(2, 3), k=1)


@pytest.mark.slow
def test_trained_demo_model_finds_the_captioned_video(tmp_path):
    """The demo's checkpoint, then the two documented commands: the report and a search over the test videos."""
    from tvr.demo import DemoConfig, run_demo

    cfg = DemoConfig(n_train_videos=36, n_test_videos=12, epochs=2)
    run_demo(output_dir=str(tmp_path), seed=0, progress=False, config=cfg)
    data = tmp_path / "data"
    samples = msrvtt.load_split(data, data / "videos", "test")
    videos = tmp_path / "test_videos"
    videos.mkdir()
    for s in samples:
        shutil.copy2(s.video_path, videos / s.video_path.name)
    ckpt = str(tmp_path / "run" / "model_best.pt")
    assert (tmp_path / "run" / "report" / "report.html").is_file()  # the demo writes its own report
    assert main(["index", str(videos), "--checkpoint", ckpt, "--index", str(tmp_path / "ix"), "--no_progress"]) == 0
    model, source = load_search_model(ckpt)
    index = VideoIndex.open(tmp_path / "ix")
    hits = index.search(encode_queries(model, source, [s.text for s in samples]), k=5)
    found = [s.video_path.name in {Path(e.path).name for e, _ in row} for s, row in zip(samples, hits)]
    print(f"captioned video in the top 5 for {sum(found)} of {len(samples)} test captions")
    assert sum(found) >= 0.75 * len(samples), found  # chance: 5 / 12
    first = next(i for i, f in enumerate(found) if f)
    assert main(["search", samples[first].text, "--index", str(tmp_path / "ix"), "--top_k", "5", "--html"]) == 0
    dom = check_page_files(tmp_path / "ix" / "search.html")
    assert samples[first].video_path.name in {Path(h["path"]).name for h in dom.hits}
    from tvr.report_cli import main as report_main

    assert report_main([ckpt, "--no_progress", "--num_workers", "0"]) == 0
    page = tmp_path / "run" / "eval_test" / "report" / "report.html"
    assert check_page_files(page).sections
