"""examples/tvr/data/base.py: RetrievalDataset items, broken videos, random captions, grouping."""

from __future__ import annotations

import pytest
import torch
from tvr.data import FrameConfig, RetrievalDataset, Sample, group_by_video, msrvtt
from tvr.video import VideoDecodeError

from tests.examples.fixtures import fake_tokenize, make_msrvtt_fixture, read_barcodes

FRAMES = FrameConfig(max_frames=4, image_resolution=32)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_msrvtt_fixture(tmp_path_factory.mktemp("msrvtt"))


def test_item_shapes_dtypes_and_content(fx):
    samples = msrvtt.load_split(fx.data_path, fx.features_path, "test")[:2]
    ds = RetrievalDataset(samples, fake_tokenize(6), FRAMES)
    item = ds[1]
    assert set(item) == {"text_ids", "video", "video_mask", "index"}
    assert item["text_ids"].shape == (6,) and item["text_ids"].dtype == torch.long
    assert torch.equal(item["text_ids"], fake_tokenize(6)([samples[1].text])[0])
    assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
    assert item["video_mask"].tolist() == [1, 1, 1, 1] and item["index"] == 1
    assert read_barcodes(item["video"]) == [0, 5, 15, 25]  # linspace(0, 5, 4) of frames 0, 5, ..., 25
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = next(iter(loader))
    assert batch["video"].shape == (2, 4, 3, 32, 32) and batch["index"].tolist() == [0, 1]


def test_missing_video_fails_early_naming_it(fx):
    samples = msrvtt.load_split(fx.data_path, fx.features_path, "train")
    with pytest.raises(FileNotFoundError, match="video5.mp4"):
        RetrievalDataset(samples, fake_tokenize(), FRAMES)


def test_corrupt_video_raises_naming_it(fx):
    samples = msrvtt.load_split(fx.data_path, fx.features_path, "test")
    ds = RetrievalDataset(samples, fake_tokenize(), FRAMES)
    with pytest.raises(VideoDecodeError, match="video8.mp4"):
        ds[2]


def test_skip_broken_drops_and_counts(fx):
    train = msrvtt.load_split(fx.data_path, fx.features_path, "train")
    test = msrvtt.load_split(fx.data_path, fx.features_path, "test")
    ds = RetrievalDataset(train + test, fake_tokenize(), FRAMES, skip_broken=True)
    skipped = sorted({s.video_id for s, _ in ds.skipped})
    assert skipped == ["video5", "video8"]
    assert len(ds.skipped) == 3 + 1 and len(ds) == len(train) + len(test) - 4
    assert all(item_ok(ds[i]) for i in range(0, len(ds), 5))


def item_ok(item) -> bool:
    return bool(item["video_mask"].sum() > 0 and item["video"][0].abs().sum() > 0)


def test_runtime_failure_is_replaced_not_zeroed(fx):
    test = msrvtt.load_split(fx.data_path, fx.features_path, "test")
    good = test[0]
    beyond = Sample(good.video_id, good.video_path, "after the end", start=100.0, end=120.0)
    ds = RetrievalDataset([beyond, test[1]], fake_tokenize(), FRAMES, skip_broken=True)
    item = ds[0]
    assert item["index"] == 1 and item_ok(item) and ds.runtime_failures == 1
    with pytest.raises(VideoDecodeError, match="no frame"):
        RetrievalDataset([beyond], fake_tokenize(), FRAMES)[0]


def test_random_caption_per_access(fx):
    samples = msrvtt.load_split(fx.data_path, fx.features_path, "train", expand_sentences=False)
    ds = RetrievalDataset(samples[:1], fake_tokenize(), FRAMES)
    torch.manual_seed(0)
    seen = {ds.text_of(0) for _ in range(40)}
    assert seen == set(samples[0].captions)


def test_group_by_video_and_bad_tokenizer(fx):
    samples = msrvtt.load_split(fx.data_path, fx.features_path, "train")
    videos, gt = group_by_video(samples)
    assert [v.video_id for v in videos] == [f"video{i}" for i in range(6)]
    assert [videos[k].video_id for k in gt.tolist()] == [s.video_id for s in samples]
    test = msrvtt.load_split(fx.data_path, fx.features_path, "test")
    ds = RetrievalDataset(test[:1], lambda texts: torch.zeros(8, dtype=torch.long), FRAMES)
    with pytest.raises(ValueError, match="tokenize must return"):
        ds[0]
    with pytest.raises(ValueError, match="slice_framepos"):
        FrameConfig(max_frames=4, slice_framepos=3)
