"""Video decoding for text-video retrieval: CLIP4Clip's frame rule on PyAV.

The frame rule (``RawVideoExtractorCV2.video_to_tensor`` and the dataloaders of CLIP4Clip):

* ``fps = int(stream fps)``, so a 29.97 fps video counts as 29 fps;
* with ``feature_framerate = f``, the frames at indices ``sec * fps + k * (fps // f)``
  (``k < f``) are taken for every second ``sec`` from ``start`` to ``end`` inclusive
  (``end`` defaults to the end of the video); decoding stops at the first frame that
  cannot be read, so the clip ends where the video ends;
* if more than ``max_frames`` frames were read, ``slice_framepos`` picks ``max_frames`` of
  them: 0 = the first ones, 1 = the last ones, 2 = ``linspace(0, n - 1, max_frames)`` cast
  to int (the published setting);
* fewer frames are zero-padded at the end, with a frame mask of 1 on the real ones.

Per frame: bicubic resize of the short side to ``R`` (PIL, as CLIP's preprocessing), centre
crop ``R x R``, RGB in [0, 1], CLIP mean/std normalisation.

Frames are counted in presentation order from the first decoded frame; no seeking is done,
so the result does not depend on key-frame placement. Shape letters: T = ``max_frames``,
R = ``image_resolution``. Tests: ``tests/examples/test_video.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FrameConfig",
    "CLIP_MEAN",
    "CLIP_STD",
    "VideoDecodeError",
    "decode_frames",
    "denormalize",
    "frame_indices",
    "frames_to_tensor",
    "load_frames",
    "pick_codec",
    "probe_video",
    "select_frames",
    "video_duration",
    "video_fps",
    "write_video",
]


@dataclass
class FrameConfig:
    """How frames are read: the frame rule of this module's docstring, and the crop size."""

    max_frames: int  # T: frames kept per clip (zero-padded with a mask below that)
    feature_framerate: int = 1  # frames per second read; CLIP4Clip's default and published setting
    slice_framepos: int = 2  # above max_frames: 0 = head, 1 = tail, 2 = uniform
    image_resolution: int = 224  # R: short side resize then R x R centre crop

    def __post_init__(self) -> None:
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.feature_framerate < 0:
            raise ValueError(f"feature_framerate must be >= 0, got {self.feature_framerate}")
        if self.slice_framepos not in (0, 1, 2):
            raise ValueError(f"slice_framepos must be 0, 1 or 2, got {self.slice_framepos}")
        if self.image_resolution < 1:
            raise ValueError(f"image_resolution must be >= 1, got {self.image_resolution}")

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoDecodeError(RuntimeError):
    """A video that is missing or cannot be decoded; ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) through pickling (DataLoader workers)
        return (type(self), (self.path, self.reason))


def _import_av():
    try:
        import av
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding videos needs PyAV: pip install 'muse-pyramid[examples]' (or pip install av)"
        ) from err
    return av


# ----------------------------------------------------------------------------- frame rule


def frame_indices(
    fps: int, feature_framerate: int = 1, start: float | None = None, end: float | None = None
) -> Iterator[int]:
    """Frame indices CLIP4Clip reads, in increasing order; the caller stops at the first failure.

    Args:
        fps: integer frame rate (``int(stream fps)``), at least 1.
        feature_framerate: frames per second to take; 0 takes every frame. When it exceeds
            ``fps`` every frame is taken (CLIP4Clip asserts instead).
        start, end: clip bounds in seconds, cast with ``int`` as CLIP4Clip does; ``end`` is
            inclusive; ``None`` means the start / the end of the video. ``start == end``
            reads one more second; ``start > end`` is swapped.

    Yields indices without end when ``end`` is None: the decoder stops when the video does.
    """
    if fps < 1:
        raise ValueError(f"fps must be an integer >= 1, got {fps}")
    if feature_framerate < 0:
        raise ValueError(f"feature_framerate must be >= 0, got {feature_framerate}")
    start_sec = max(int(start), 0) if start is not None else 0
    end_sec = None
    if end is not None:
        end_sec = max(int(end), 0)
        if start_sec > end_sec:
            start_sec, end_sec = end_sec, start_sec
        elif start_sec == end_sec:
            end_sec += 1
    if feature_framerate == 0:
        offsets = list(range(fps))
    else:
        interval = max(fps // feature_framerate, 1)
        offsets = list(range(0, fps, interval))[:feature_framerate]
    sec = start_sec
    while end_sec is None or sec <= end_sec:
        for off in offsets:
            yield sec * fps + off
        sec += 1


def select_frames(n: int, max_frames: int, slice_framepos: int) -> list[int]:
    """Positions (into the ``n`` frames read) that are kept: CLIP4Clip's ``slice_framepos``.

    0 = head, 1 = tail, 2 = ``np.linspace(0, n - 1, max_frames, dtype=int)``. With
    ``n <= max_frames`` every frame is kept.
    """
    if slice_framepos not in (0, 1, 2):
        raise ValueError(f"slice_framepos must be 0 (head), 1 (tail) or 2 (uniform), got {slice_framepos}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if n <= max_frames:
        return list(range(n))
    if slice_framepos == 0:
        return list(range(max_frames))
    if slice_framepos == 1:
        return list(range(n - max_frames, n))
    return np.linspace(0, n - 1, num=max_frames, dtype=int).tolist()


# ----------------------------------------------------------------------------- decoding


def _stream_rate(stream) -> Fraction | None:
    for attr in ("average_rate", "guessed_rate", "base_rate"):
        rate = getattr(stream, attr, None)
        if rate:
            return Fraction(rate)
    return None


def video_fps(path: str | Path) -> float:
    """The stream frame rate of ``path`` as stored in the file (e.g. 29.97...)."""
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            rate = _stream_rate(container.streams.video[0])
    except av.FFmpegError as err:
        raise VideoDecodeError(path, f"{type(err).__name__}: {err}") from err
    if rate is None:
        raise VideoDecodeError(path, "the video stream has no frame rate")
    return float(rate)


def _to_clip_uint8(image, resolution: int) -> np.ndarray:
    """PIL image -> (R, R, 3) uint8: bicubic short side to R, centre crop (torchvision's arithmetic)."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resolution, int(resolution * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _decode_selected(
    path: Path, frames: FrameConfig, start: float | None, end: float | None, stop_after: int | None
) -> list[np.ndarray]:
    """Decode the frames of the frame rule, each resized/cropped to (R, R, 3) uint8."""
    av = _import_av()
    if not path.is_file():
        raise VideoDecodeError(path, "file not found")
    images: list[np.ndarray] = []
    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise VideoDecodeError(path, f"{type(err).__name__}: {err}") from err
    with container:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = _stream_rate(stream)
        if rate is None:
            raise VideoDecodeError(path, "the video stream has no frame rate")
        fps = int(rate)
        if fps < 1:
            raise VideoDecodeError(path, f"frame rate {float(rate):.3f} is below 1 fps")
        wanted = frame_indices(fps, frames.feature_framerate, start, end)
        target = next(wanted, None)
        try:
            for index, frame in enumerate(container.decode(stream)):
                if target is None:
                    break
                if index < target:
                    continue
                # index == target: frames are visited in order and targets strictly increase
                images.append(_to_clip_uint8(frame.to_image(), frames.image_resolution))
                target = next(wanted, None)
                if stop_after is not None and len(images) >= stop_after:
                    break
        except av.FFmpegError as err:  # CLIP4Clip stops at the first frame it cannot read
            logger.debug("decoding %s stopped after %d frames: %s", path, len(images), err)
    if not images:
        raise VideoDecodeError(path, "no frame could be decoded in the requested range")
    return images


def decode_frames(
    path: str | Path, frames: FrameConfig, start: float | None = None, end: float | None = None
) -> np.ndarray:
    """The frames of the frame rule that a clip keeps, as images (no normalisation, no padding).

    Args:
        path: video file.
        frames: ``FrameConfig`` (max_frames T, feature_framerate, slice_framepos, image_resolution R).
        start, end: clip bounds in seconds (see ``frame_indices``); ``None`` = whole video.

    Returns:
        ``(n, R, R, 3)`` uint8 RGB, ``1 <= n <= T``: exactly the frames ``load_frames`` feeds the model
        (``frames_to_tensor`` turns them into its input), e.g. for thumbnails from the same decode.

    Raises:
        VideoDecodeError: the file is missing, cannot be opened, or yields no frame.
    """
    path = Path(path)
    stop_after = frames.max_frames if frames.slice_framepos == 0 else None  # the head needs no more frames
    images = _decode_selected(path, frames, start, end, stop_after)
    keep = select_frames(len(images), frames.max_frames, frames.slice_framepos)
    return np.stack([images[k] for k in keep])


def frames_to_tensor(images: np.ndarray, max_frames: int) -> tuple[Tensor, Tensor]:
    """``(n, R, R, 3)`` uint8 images (``n <= max_frames``) -> the model's input ``(video, video_mask)``.

    Returns ``video`` (T, 3, R, R) float32, CLIP-normalised, zero on padded frames, and ``video_mask``
    (T,) int64, 1 on the ``n`` real frames (which come first), with T = ``max_frames``.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or not 1 <= images.shape[0] <= max_frames:
        raise ValueError(f"images must be (n, R, R, 3) with 1 <= n <= max_frames={max_frames}, got {images.shape}")
    n, R = images.shape[0], images.shape[1]
    clip = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    video = torch.zeros(max_frames, 3, R, R)
    video[:n] = (clip - mean) / std
    mask = torch.zeros(max_frames, dtype=torch.long)
    mask[:n] = 1
    return video, mask


def load_frames(
    path: str | Path, frames: FrameConfig, start: float | None = None, end: float | None = None
) -> tuple[Tensor, Tensor]:
    """Decode ``path`` with CLIP4Clip's frame rule.

    Args:
        path: video file.
        frames: ``FrameConfig`` (max_frames T, feature_framerate, slice_framepos, image_resolution R).
        start, end: clip bounds in seconds (see ``frame_indices``); ``None`` = whole video.

    Returns:
        ``video`` (T, 3, R, R) float32, CLIP-normalised, zero on padded frames, and
        ``video_mask`` (T,) int64, 1 on real frames (which come first).

    Raises:
        VideoDecodeError: the file is missing, cannot be opened, or yields no frame.
    """
    return frames_to_tensor(decode_frames(path, frames, start, end), frames.max_frames)


def video_duration(path: str | Path) -> float | None:
    """Duration of ``path`` in seconds from the container header (no frame is decoded); None if unknown."""
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if container.duration is not None:
                return container.duration / 1_000_000  # av.time_base
            if container.streams.video:
                stream = container.streams.video[0]
                if stream.duration is not None and stream.time_base is not None:
                    return float(stream.duration * stream.time_base)
    except av.FFmpegError as err:
        raise VideoDecodeError(path, f"{type(err).__name__}: {err}") from err
    return None


def probe_video(path: str | Path) -> str | None:
    """Cheap health check: ``None`` if ``path`` opens and its first frame decodes, else the reason."""
    av = _import_av()
    path = Path(path)
    if not path.is_file():
        return "file not found"
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
            stream = container.streams.video[0]
            rate = _stream_rate(stream)
            if rate is None or int(rate) < 1:
                return "no usable frame rate"
            for _ in container.decode(stream):
                return None
    except av.FFmpegError as err:
        return f"{type(err).__name__}: {err}"
    return "no frame could be decoded"


# ----------------------------------------------------------------------------- writing

_CODECS = {
    ".mp4": ("libx264", "mpeg4"),
    ".m4v": ("libx264", "mpeg4"),
    ".mov": ("libx264", "mpeg4"),
    ".mkv": ("libx264", "mpeg4"),
    ".avi": ("mpeg4",),
    ".webm": ("libvpx-vp9", "libvpx"),
}
_CODEC_OPTIONS = {
    "libx264": {"crf": "12", "preset": "veryfast"},
    "libvpx-vp9": {"crf": "12", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "libvpx": {"crf": "10", "b": "2M", "deadline": "realtime", "cpu-used": "8"},
    "mpeg4": {"qscale": "2"},
}


def _encodable(av, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False
    return True


def pick_codec(suffix: str) -> tuple[str, dict[str, str]]:
    """The encoder (and its options) used for a container extension such as ``".mp4"``."""
    av = _import_av()
    suffix = suffix.lower()
    if suffix not in _CODECS:
        raise ValueError(f"unknown video extension {suffix!r}; use one of {sorted(_CODECS)}")
    for codec in _CODECS[suffix]:
        if _encodable(av, codec):
            return codec, dict(_CODEC_OPTIONS.get(codec, {}))
    raise RuntimeError(f"this PyAV build can encode none of {_CODECS[suffix]} for {suffix}")


def write_video(
    path: str | Path, frames: np.ndarray | Tensor, fps: float | Fraction, codec: str | None = None
) -> Path:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB to ``path``; the container follows the extension.

    ``.mp4 .m4v .mov .mkv``: H.264 (libx264), else MPEG-4 part 2; ``.avi``: MPEG-4 part 2;
    ``.webm``: VP9, else VP8. ``fps`` may be fractional (29.97 is stored as 30000/1001).
    H and W must be even (yuv420p). Used by the test fixtures and the synthetic data set.
    """
    av = _import_av()
    path = Path(path)
    if isinstance(frames, Tensor):
        frames = frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got shape {frames.shape} dtype {frames.dtype}")
    T, H, W, _ = frames.shape
    if T < 1 or H % 2 or W % 2:
        raise ValueError(f"frames need T >= 1 and even H, W (yuv420p), got T={T}, H={H}, W={W}")
    rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if codec is None:
        codec, options = pick_codec(path.suffix)
    else:
        options = dict(_CODEC_OPTIONS.get(codec, {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def denormalize(video: Tensor) -> Tensor:
    """Undo the CLIP normalisation: (..., 3, R, R) -> RGB in [0, 1] (for checks and plots)."""
    mean = torch.tensor(CLIP_MEAN, dtype=video.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=video.dtype).view(3, 1, 1)
    return video * std + mean

