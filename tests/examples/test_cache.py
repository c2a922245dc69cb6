"""examples/tvr/cache: feature cache contents, resumability, multi-process writing, manifest checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tvr.cache import (
    CachedRetrievalDataset,
    CacheMismatchError,
    build_cache,
    check_settings,
    encode_clip_tokens,
    encode_text_features,
    expected_bytes,
    load_manifest,
)
from tvr.cache.format import (
    CacheShardError,
    open_memmap,
    read_header,
    sha256_file,
    write_safetensors,
)
from tvr.cache.writer import frame_settings
from tvr.data import FrameConfig, RetrievalDataset, msrvtt
from tvr.distributed import DistInfo

from tests.examples._pipeline_utils import tiny_clip
from tests.examples.fixtures import make_msrvtt_fixture

pytest.importorskip("open_clip")
pytest.importorskip("safetensors")

FRAMES = FrameConfig(max_frames=4, image_resolution=32)
MAX_WORDS = 8
SETTINGS = {"dataset": "msrvtt", "data_options": {}, "backbone": "small test CLIP", "weights": "random-init:0",
            "max_words": MAX_WORDS, "tokenizer": "clip-bpe-49408"}
RUN = {**SETTINGS, **frame_settings(FRAMES)}  # what a training run with FRAMES compares
SHARDS = {"shard_clips": 2, "shard_texts": 4, "batch_size": 1, "progress": False}


def small_clip(seed: int = 0):
    """The shared tiny CLIP at this file's frame size (32 px, a 2 x 2 grid) and caption length."""
    return tiny_clip(seed, image_size=32, patch_size=16, context_length=MAX_WORDS)


def tokenize(texts):
    from muse_pyramid.backbones import clip_tokenize

    return clip_tokenize(texts, MAX_WORDS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Readable MSR-VTT fixture splits (video5 is missing and video8 corrupt: left out)."""
    fx = make_msrvtt_fixture(tmp_path_factory.mktemp("msrvtt"), captions_per_video=2)
    splits = {}
    for split in ("train", "test"):
        samples = msrvtt.load_split(fx.data_path, fx.features_path, split)
        splits[split] = RetrievalDataset(samples, tokenize, FRAMES, skip_broken=True).samples
    by_video = msrvtt.load_split(fx.data_path, fx.features_path, "train", expand_sentences=False)
    splits["by_video"] = RetrievalDataset(by_video, tokenize, FRAMES, skip_broken=True).samples
    return fx, splits


def write(cache_dir, splits, clip=None, info=None, **kwargs):
    return build_cache(clip or small_clip(), splits, cache_dir, SETTINGS, frames=FRAMES, tokenize=tokenize,
                       info=info, **{**SHARDS, **kwargs})


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cache_holds_frozen_clip_outputs_in_fp16(data, tmp_path, tolerances):
    _, splits = data
    clip = small_clip()
    manifest = write(tmp_path, {"train": splits["train"]}, clip)
    ds = CachedRetrievalDataset(tmp_path, "train", settings=RUN)
    online = RetrievalDataset(splits["train"], tokenize, FRAMES)
    assert len(ds) == len(online) == 10 and [s.video_id for s in ds.samples] == [s.video_id for s in online.samples]
    rtol, atol = tolerances[torch.float16]["out"]
    for i in (0, 3, 6, 9):  # items 3 and 8: video3, 2 s long, so 2 of 4 frames are real
        item, ref = ds[i], online[i]
        assert set(item) == {"tokens", "video_mask", "text_feat", "text_ids", "index"} and item["index"] == i
        assert item["tokens"].dtype == torch.float32 and item["tokens"].shape == (4, 1 + 2 * 2, 32)
        assert torch.equal(item["video_mask"], ref["video_mask"]) and torch.equal(item["text_ids"], ref["text_ids"])
        want = encode_clip_tokens(clip, ref["video"][None], ref["video_mask"][None])[0]
        torch.testing.assert_close(item["tokens"], want, rtol=rtol, atol=atol * want.abs().max().item())
        assert item["tokens"][ref["video_mask"] == 0].abs().sum() == 0  # zero on padded frames
        feat = encode_text_features(clip, ref["text_ids"][None])[0]
        torch.testing.assert_close(item["text_feat"], feat, rtol=rtol, atol=atol * feat.abs().max().item())
    assert ds[3]["video_mask"].tolist() == ds[8]["video_mask"].tolist() == [1, 1, 0, 0]

    entry = manifest["splits"]["train"]
    assert manifest["settings"]["max_frames"] == 4 and manifest["settings"]["weights"] == "random-init:0"
    assert manifest["settings"]["decoder"].startswith("av ")
    assert entry["n_clips"] == 5 and entry["n_texts"] == 10 and len(entry["video_shards"]) == 3
    data_bytes = sum(f["bytes"] - read_header(tmp_path / "train" / f["name"])[1]
                     for f in entry["video_shards"] + entry["text_shards"])
    assert data_bytes == expected_bytes(5, 10, 4, 5, 32, MAX_WORDS)["total"]
    # standard safetensors files
    from safetensors.torch import load_file

    shard = load_file(str(tmp_path / "train" / "videos-00001.safetensors"))
    assert shard["tokens"].dtype == torch.float16 and shard["clip_index"].tolist() == [2, 3]
    torch.testing.assert_close(shard["tokens"][1].float(), ds[3]["tokens"])
    # workers map the shards themselves (the dataset pickles without its maps)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (5, 4, 5, 32) and batch["index"].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(batch["tokens"][4], ds[4]["tokens"])


def test_eval_views_and_random_caption_draws(data, tmp_path):
    _, splits = data
    write(tmp_path, {"test": splits["test"], "train": splits["by_video"]})
    test = CachedRetrievalDataset(tmp_path, "test")
    clips = test.clips()
    assert len(clips) == 2 and clips[1]["tokens"].shape == (4, 5, 32)
    torch.testing.assert_close(clips[1]["tokens"], test[1]["tokens"])
    assert test.text_features().shape == (2, 32)
    # one sample per video holding its captions: the same draw as RetrievalDataset for the same seed
    cached = CachedRetrievalDataset(tmp_path, "train")
    online = RetrievalDataset(splits["by_video"], tokenize, FRAMES)
    assert all(cached.draw) and len(cached) == 5
    torch.manual_seed(3)
    got = [cached[i]["text_ids"] for i in range(5) for _ in range(4)]
    torch.manual_seed(3)
    want = [online.tokens([online.text_of(i)])[0] for i in range(5) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len({tuple(t.tolist()) for t in got[:4]}) > 1  # the draw really varies


class Stop(RuntimeError):
    pass


def test_killed_run_resumes_byte_identical(data, tmp_path):
    _, splits = data
    todo = {"train": splits["train"], "test": splits["test"]}
    write(tmp_path / "full", todo)

    written = []

    def stop_after_second_shard(split, kind, k):
        written.append((split, kind, k))
        if len(written) == 2:
            raise Stop("killed")

    part = tmp_path / "part"
    with pytest.raises(Stop):
        write(part, todo, on_shard=stop_after_second_shard)
    # a shard being written when the process died: a temporary file, never a final one
    (part / "train" / ".videos-00002.safetensors.tmp").write_bytes(b"half a shard")
    assert not (part / "train" / "videos-00002.safetensors").exists()
    assert not load_manifest(part)["splits"]
    mtimes = {p: p.stat().st_mtime_ns for p in (part / "train").glob("videos-*")}

    written.clear()
    write(part, todo, on_shard=lambda *a: written.append(a))
    assert ("train", "videos", 0) not in written and ("train", "videos", 2) in written
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished shards were kept
    assert tree_bytes(part) == tree_bytes(tmp_path / "full")
    assert not list(part.rglob("*.tmp"))


def _rank_worker(rank: int, world: int, cache_dir: str, splits, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shards = []
        write(cache_dir, splits, info=DistInfo(rank=rank, world_size=world),
              on_shard=lambda *a: shards.append(a))
        assert all(k % world == rank for _, _, k in shards), shards
    finally:
        dist.destroy_process_group()


def test_two_processes_write_the_same_cache(data, tmp_path):
    _, splits = data
    todo = {"train": splits["train"]}
    write(tmp_path / "one", todo)
    port = 29500 + os.getpid() % 2000
    # fork: the children reuse the imported modules (spawn would re-import torch and open_clip)
    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "two"), todo, port), nprocs=2, join=True,
                       start_method="fork")
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def test_settings_mismatch_raises_naming_fields(data, tmp_path):
    _, splits = data
    write(tmp_path, {"test": splits["test"]})
    other = {**RUN, "weights": "sha256:" + "0" * 64}
    with pytest.raises(CacheMismatchError, match=r"weights differ.*cache 'random-init:0'"):
        CachedRetrievalDataset(tmp_path, "test", settings=other)
    manifest = load_manifest(tmp_path)
    with pytest.raises(CacheMismatchError, match=r"max_frames.*cache 4, run 8"):
        check_settings(manifest, {**manifest["settings"], "max_frames": 8})
    check_settings(manifest, dict(manifest["settings"]))  # equal settings pass
    # resuming a caching run with another frame rule refuses to mix shards
    with pytest.raises(CacheMismatchError, match="max_frames: cache 4, run 3"):
        build_cache(small_clip(), {"test": splits["test"]}, tmp_path, SETTINGS,
                    frames=FrameConfig(max_frames=3, image_resolution=32), tokenize=tokenize, **SHARDS)
    with pytest.raises(FileNotFoundError, match="no complete 'train' split"):
        CachedRetrievalDataset(tmp_path, "train")
    victim = tmp_path / "test" / "videos-00000.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CacheShardError, match="videos-00000.safetensors is missing or damaged"):
        CachedRetrievalDataset(tmp_path, "test")
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="videos-00000.safetensors is missing"):
        CachedRetrievalDataset(tmp_path, "test")


def test_disk_space_is_checked_before_writing(data, tmp_path, monkeypatch, capsys):
    _, splits = data
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match="not enough disk space"):
        write(tmp_path, {"train": splits["train"]})
    assert "5 clips x 4 frames x 5 tokens x 32 (fp16)" in capsys.readouterr().out
    assert not list((tmp_path / "train").glob("*.safetensors"))


def test_expected_size_of_msrvtt_9k():
    size = expected_bytes(9000, 180_000, 12, 50, 512, 32)
    assert 5.5e9 < size["videos"] < 5.6e9  # 9,000 x 12 x 50 x 512 x 2 B, plus masks and indices
    assert size["texts"] == 180_000 * (512 * 2 + 32 * 4 + 8)  # fp16 features, int32 ids, int64 index


def test_writer_is_deterministic_and_maps_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 2, generator=g).half(), "a": torch.arange(4, dtype=torch.int64),
               "m": torch.randint(0, 2, (3, 5), generator=g, dtype=torch.uint8)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v", "a": "1"})
    write_safetensors(tmp_path / "y.safetensors", dict(reversed(tensors.items())), {"a": "1", "k": "v"})
    assert sha256_file(tmp_path / "x.safetensors") == sha256_file(tmp_path / "y.safetensors")
    maps = open_memmap(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert torch.equal(torch.from_numpy(maps[k][1:2].copy()), v[1:2])
    with pytest.raises(TypeError, match="dtype"):
        write_safetensors(tmp_path / "z.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})
