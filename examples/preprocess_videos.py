"""Optional pre-compression of a video folder: 3 fps, short side 224, video only (CLIP4Clip's recipe).

    python examples/preprocess_videos.py --input_dir videos --output_dir videos_3fps_224 --workers 8

Every video under ``--input_dir`` (recursively) is re-encoded to ``--output_dir`` under the
same relative path and file name, so the data readers match it exactly as they match the
originals (an extension PyAV cannot write here, e.g. ``.3gp``, gets ``.mp4`` appended, which
the DiDeMo reader strips). Frames are resampled to ``--fps`` by time stamp (each output
instant ``k / fps`` takes the input frame nearest in time), the short side is scaled to
``--size`` (bicubic; the long side keeps the aspect ratio, rounded to an even number;
portrait videos work the same way), and audio is dropped.

Resumable: each output is written under a temporary name and renamed when complete, so an
existing output is always complete and is skipped (``--overwrite`` redoes it). Runs in a
process pool with a progress bar; failures are listed at the end (exit status 1).

Pre-compressed input shifts R@1 by about 0.5-1.6 points either way: report which input was
used. Tests: ``tests/examples/test_data_preprocess.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the pipeline package `tvr` sits beside this script

from tvr.data.base import VIDEO_EXTENSIONS, list_video_files  # noqa: E402
from tvr.video import _CODECS, pick_codec  # noqa: E402


def output_path(src: Path, input_dir: Path, output_dir: Path) -> Path:
    """Where ``src`` goes: same relative path; ``.mp4`` appended when its extension cannot be written."""
    dst = output_dir / src.relative_to(input_dir)
    if dst.suffix.lower() not in _CODECS:
        dst = dst.with_name(dst.name + ".mp4")
    return dst


def scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side = ``size`` and the long side even, aspect kept."""
    if width <= height:
        return size, max(2, int(round(height * size / width / 2)) * 2)
    return max(2, int(round(width * size / height / 2)) * 2), size


def reencode(src: str | Path, dst: str | Path, fps: float = 3, size: int = 224) -> int:
    """Re-encode ``src`` to ``dst`` (written to a temporary name, then renamed); returns frames written."""
    import av

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial{dst.suffix}")
    codec, options = pick_codec(dst.suffix)
    rate = Fraction(fps).limit_denominator(1001)
    written = 0
    try:
        with av.open(str(src)) as inp, av.open(str(tmp), mode="w") as out:
            if not inp.streams.video:
                raise ValueError(f"{src} has no video stream")
            stream_in = inp.streams.video[0]
            stream_in.thread_type = "AUTO"
            in_rate = stream_in.average_rate or stream_in.guessed_rate or 30
            stream = None
            next_k, prev, prev_t, t0 = 0, None, 0.0, None

            def emit(frame) -> None:
                nonlocal stream, written
                if stream is None:
                    w, h = scaled_size(frame.width, frame.height, size)
                    stream = out.add_stream(codec, rate=rate, options=options)
                    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                small = frame.reformat(width=stream.width, height=stream.height, format="yuv420p",
                                       interpolation="BICUBIC")
                small.pts, small.time_base = written, 1 / rate
                for packet in stream.encode(small):
                    out.mux(packet)
                written += 1

            for i, frame in enumerate(inp.decode(stream_in)):
                t = frame.time if frame.time is not None else i / float(in_rate)
                t0 = t if t0 is None else t0
                t -= t0  # time from the first frame (some files start at a non-zero time stamp)
                # every output instant up to t takes whichever of prev / frame is nearer in time
                while next_k / rate <= t:
                    target = float(next_k / rate)
                    emit(prev if prev is not None and target - prev_t <= t - target else frame)
                    next_k += 1
                prev, prev_t = frame, t
            if stream is None:
                raise ValueError(f"{src}: no frame could be decoded")
            for packet in stream.encode():
                out.mux(packet)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


def _job(src: str, dst: str, fps: float, size: int) -> tuple[str, str | None]:
    try:
        reencode(src, dst, fps, size)
    except Exception as err:  # noqa: BLE001 - reported per file, the run goes on
        return src, f"{type(err).__name__}: {err}"
    return src, None


def preprocess(
    input_dir: str | Path, output_dir: str | Path, fps: float = 3, size: int = 224, workers: int = 1,
    overwrite: bool = False, progress: bool = True,
) -> dict:
    """Re-encode every video under ``input_dir``; returns ``{"done", "skipped", "failed": [(src, reason)]}``."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise ValueError("output_dir must differ from input_dir")
    todo, skipped = [], 0
    for src in list_video_files(input_dir, VIDEO_EXTENSIONS):
        dst = output_path(src, input_dir, output_dir)
        if dst.exists() and not overwrite:
            skipped += 1
        else:
            todo.append((str(src), str(dst)))
    failed: list[tuple[str, str]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="re-encoding", unit="video")
    if workers <= 1:
        results = (_job(s, d, fps, size) for s, d in todo)
        for src, err in results:
            if err:
                failed.append((src, err))
            if bar:
                bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_job, s, d, fps, size) for s, d in todo]
            for fut in as_completed(futures):
                src, err = fut.result()
                if err:
                    failed.append((src, err))
                if bar:
                    bar.update()
    if bar:
        bar.close()
    return {"done": len(todo) - len(failed), "skipped": skipped, "failed": sorted(failed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_dir", required=True, help="folder of original videos (searched recursively)")
    parser.add_argument("--output_dir", required=True, help="folder for the re-encoded videos (same layout)")
    parser.add_argument("--fps", type=float, default=3.0, help="output frame rate (CLIP4Clip: 3)")
    parser.add_argument("--size", type=int, default=224, help="output short side in pixels (CLIP4Clip: 224)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    args = parser.parse_args(argv)
    result = preprocess(args.input_dir, args.output_dir, args.fps, args.size, args.workers, args.overwrite)
    print(f"re-encoded {result['done']}, skipped {result['skipped']} existing, failed {len(result['failed'])}")
    for src, err in result["failed"]:
        print(f"  failed: {src}: {err}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
