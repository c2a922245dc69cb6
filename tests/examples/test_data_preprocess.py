"""examples/preprocess_videos.py: 3 fps, short side 224 (portrait too), resumable, parallel."""

from __future__ import annotations

import pytest
from preprocess_videos import main, output_path, preprocess, scaled_size
from tvr.video import FrameConfig, load_frames, video_fps

from tests.examples.fixtures import read_barcodes, write_corrupt_video, write_indexed_video

av = pytest.importorskip("av")


def _size(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.width, s.height


def test_reencode_fps_size_and_resume(tmp_path):
    src = tmp_path / "in"
    write_indexed_video(src / "land.mp4", 40, 10)  # 4 s at 10 fps, 64 x 48
    write_indexed_video(src / "sub" / "port.webm", 40, 10, height=64, width=48)
    write_corrupt_video(src / "bad.mp4")
    out = tmp_path / "out"
    result = preprocess(src, out, fps=3, size=32, workers=2, progress=False)
    assert result["done"] == 2 and result["skipped"] == 0 and [s for s, _ in result["failed"]] == [str(src / "bad.mp4")]
    land, port = out / "land.mp4", out / "sub" / "port.webm"
    assert _size(land) == (42, 32) and _size(port) == (32, 42)
    assert video_fps(land) == pytest.approx(3.0)
    assert not list(out.rglob(".*partial*"))
    # output frames at t = 0, 1/3, 2/3, ... take input frames 0, 3, 7, 10, ...: second s shows frame 10 s
    video, mask = load_frames(land, FrameConfig(max_frames=8, image_resolution=32))
    assert read_barcodes(video, mask) == [0, 10, 20, 30]

    land.write_bytes(b"not touched")  # existing outputs are skipped
    result = preprocess(src, out, fps=3, size=32, workers=1, progress=False)
    assert result["done"] == 0 and result["skipped"] == 2 and land.read_bytes() == b"not touched"
    assert main(["--input_dir", str(src), "--output_dir", str(out), "--size", "32", "--workers", "1",
                 "--overwrite"]) == 1  # the corrupt file fails
    assert _size(land) == (42, 32)


def test_helpers(tmp_path):
    assert scaled_size(640, 360, 224) == (398, 224) and scaled_size(360, 640, 224) == (224, 398)
    assert output_path(tmp_path / "a" / "x.3gp", tmp_path, tmp_path / "o").name == "x.3gp.mp4"
    with pytest.raises(ValueError, match="differ"):
        preprocess(tmp_path, tmp_path)
