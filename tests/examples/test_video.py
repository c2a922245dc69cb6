"""examples/tvr/video.py: CLIP4Clip's frame rule, preprocessing, errors, writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tvr.video import (
    CLIP_MEAN,
    CLIP_STD,
    FrameConfig,
    VideoDecodeError,
    _to_clip_uint8,
    frame_indices,
    load_frames,
    probe_video,
    select_frames,
    video_fps,
    write_video,
)

from tests.examples.fixtures import barcode_frames, read_barcodes, write_corrupt_video, write_indexed_video

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {
        "ntsc": write_indexed_video(root / "ntsc.mp4", 120, 30000 / 1001),  # 29.97 fps, ~4 s
        "ten": write_indexed_video(root / "ten.mp4", 30, 3),  # 10 s at 3 fps
        "four": write_indexed_video(root / "four.mp4", 16, 4),  # 4 s at 4 fps
        "short": write_indexed_video(root / "short.mp4", 5, 5),  # 1 s
        "webm": write_indexed_video(root / "clip.webm", 12, 4),
        "portrait": write_indexed_video(root / "portrait.mp4", 8, 4, height=64, width=48),
        "corrupt": write_corrupt_video(root / "corrupt.mp4"),
    }


def test_frame_rule_on_2997_fps_uses_int_fps(videos):
    # int(29.97) = 29: seconds 0..4 give frames 0, 29, 58, 87, 116; frame 145 does not exist
    assert video_fps(videos["ntsc"]) == pytest.approx(30000 / 1001)
    video, mask = load_frames(videos["ntsc"], FrameConfig(max_frames=8, slice_framepos=0, image_resolution=32))
    assert read_barcodes(video, mask) == [0, 29, 58, 87, 116]
    assert mask.tolist() == [1] * 5 + [0] * 3


@pytest.mark.parametrize(
    "slice_framepos, expected",
    [
        (0, [0, 3, 6, 9]),  # head
        (1, [18, 21, 24, 27]),  # tail
        (2, [0, 9, 18, 27]),  # np.linspace(0, 9, 4).astype(int) = [0, 3, 6, 9] of the 10 frames read
    ],
)
def test_slice_framepos(videos, slice_framepos, expected):
    frames = FrameConfig(max_frames=4, slice_framepos=slice_framepos, image_resolution=32)
    video, mask = load_frames(videos["ten"], frames)
    assert video.shape == (4, 3, 32, 32) and video.dtype == torch.float32
    assert mask.tolist() == [1, 1, 1, 1] and mask.dtype == torch.long
    assert read_barcodes(video) == expected


def test_uniform_slice_matches_numpy_linspace(videos):
    frames = FrameConfig(max_frames=7, slice_framepos=2, image_resolution=32)
    video, _ = load_frames(videos["ten"], frames)
    read = [3 * s for s in range(10)]
    assert read_barcodes(video) == [read[k] for k in np.linspace(0, 9, 7, dtype=int)]


def test_short_video_is_zero_padded_with_mask(videos):
    video, mask = load_frames(videos["short"], FrameConfig(max_frames=6, image_resolution=32))
    # 5 frames at 5 fps: second 0 -> frame 0; second 1 -> frame 5 does not exist
    assert mask.tolist() == [1, 0, 0, 0, 0, 0]
    assert read_barcodes(video, mask) == [0]
    assert torch.count_nonzero(video[1:]) == 0
    assert video[0].abs().sum() > 0


def test_start_end_inclusive_and_clamped(videos):
    frames = FrameConfig(max_frames=20, image_resolution=32)
    video, mask = load_frames(videos["ten"], frames, start=2.0, end=4.0)
    assert read_barcodes(video, mask) == [6, 9, 12]
    # end beyond the video: stops at the first missing frame
    video, mask = load_frames(videos["ten"], frames, start=0.0, end=31.0)
    assert read_barcodes(video, mask) == list(range(0, 30, 3))
    # start == end reads one more second (CLIP4Clip's dataloaders)
    video, mask = load_frames(videos["ten"], frames, start=5.0, end=5.0)
    assert read_barcodes(video, mask) == [15, 18]


def test_feature_framerate(videos):
    # 4 fps, 2 frames per second: offsets 0 and 4 // 2 = 2 within each second
    video, mask = load_frames(videos["four"], FrameConfig(max_frames=16, feature_framerate=2, image_resolution=32))
    assert read_barcodes(video, mask) == [0, 2, 4, 6, 8, 10, 12, 14]


def test_webm_and_portrait_decode(videos):
    video, mask = load_frames(videos["webm"], FrameConfig(max_frames=4, image_resolution=32))
    assert read_barcodes(video, mask) == [0, 4, 8]
    video, mask = load_frames(videos["portrait"], FrameConfig(max_frames=4, image_resolution=32))
    assert read_barcodes(video, mask) == [0, 4]


def test_frame_indices_rule():
    take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
    assert take(frame_indices(29), 4) == [0, 29, 58, 87]
    assert list(frame_indices(10, 1, 0, 3)) == [0, 10, 20, 30]
    assert list(frame_indices(10, 2, 1, 2)) == [10, 15, 20, 25]
    assert list(frame_indices(4, 0, 0, 1)) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert list(frame_indices(3, 5, 0, 0)) == [0, 1, 2, 3, 4, 5]  # more than fps: every frame
    assert list(frame_indices(10, 1, 3, 1)) == [10, 20, 30]  # start > end is swapped
    with pytest.raises(ValueError, match="fps"):
        next(frame_indices(0))


def test_select_frames():
    assert select_frames(3, 5, 2) == [0, 1, 2]
    assert select_frames(10, 4, 2) == [0, 3, 6, 9]
    assert select_frames(10, 3, 1) == [7, 8, 9]
    with pytest.raises(ValueError, match="slice_framepos"):
        select_frames(10, 3, 3)


@pytest.mark.parametrize("size", [(48, 64), (64, 48), (50, 50), (37, 90)])
def test_resize_crop_matches_clip_preprocessing(size):
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    h, w = size
    image = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    reference = tv.Compose([tv.Resize(32, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(32)])(image)
    np.testing.assert_array_equal(_to_clip_uint8(image, 32), np.asarray(reference))


def test_normalisation_uses_clip_mean_std(tmp_path):
    colour = np.array([200, 100, 50], dtype=np.uint8)
    path = write_video(tmp_path / "solid.mp4", np.broadcast_to(colour, (4, 32, 32, 3)).copy(), 2)
    video, mask = load_frames(path, FrameConfig(max_frames=2, image_resolution=16))
    expected = (torch.tensor(colour / 255.0) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    got = video[0].mean(dim=(1, 2)).double()
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)  # yuv420 round trip


def test_corrupt_and_missing_files_name_the_file(videos, tmp_path):
    frames = FrameConfig(max_frames=4, image_resolution=32)
    with pytest.raises(VideoDecodeError, match="corrupt.mp4") as err:
        load_frames(videos["corrupt"], frames)
    assert err.value.path == videos["corrupt"]
    with pytest.raises(VideoDecodeError, match="nothere.mp4.*not found"):
        load_frames(tmp_path / "nothere.mp4", frames)
    with pytest.raises(VideoDecodeError, match="no frame"):
        load_frames(videos["ten"], frames, start=50, end=60)
    assert probe_video(videos["corrupt"]) is not None
    assert probe_video(videos["ten"]) is None


def test_decode_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(VideoDecodeError("/x/y.mp4", "broken")))
    assert str(err.path) == "/x/y.mp4" and err.reason == "broken"


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", barcode_frames(2, 48, 64)[:, :47], 5)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 8, 8, 3), dtype=np.float32), 5)
    with pytest.raises(ValueError, match="extension"):
        write_video(tmp_path / "f.xyz", barcode_frames(2), 5)
