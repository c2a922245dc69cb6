"""Tiny copies of the five benchmarks in their exact file formats, with awkward cases.

Every frame carries its own index as a 4 x 4 bar code (16 bits, black/white cells) in the
central square of the frame, which survives compression, resizing and the centre crop:
``read_barcodes`` recovers from a decoded clip exactly which source frames were sampled.

Import from other tests as ``from tests.examples.fixtures import ...`` (the conftest of this
folder puts the repository root on sys.path).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tvr.video import denormalize, write_video

GRID = 4  # bar code: GRID x GRID cells, one bit each
LOW, HIGH, BACKGROUND = 16, 235, 128
HEIGHT, WIDTH = 48, 64  # default (landscape) fixture frame size


def barcode_frames(n_frames: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(n_frames, height, width, 3) uint8; frame t shows t in binary in its central square."""
    side = min(height, width)
    if side % GRID:
        raise ValueError(f"min(height, width) must be a multiple of {GRID}, got {side}")
    if n_frames >= 2 ** (GRID * GRID):
        raise ValueError(f"at most {2 ** (GRID * GRID) - 1} frames can be indexed, got {n_frames}")
    top, left, cell = (height - side) // 2, (width - side) // 2, side // GRID
    frames = np.full((n_frames, height, width, 3), BACKGROUND, dtype=np.uint8)
    for t in range(n_frames):
        for bit in range(GRID * GRID):
            r, c = divmod(bit, GRID)
            value = HIGH if (t >> bit) & 1 else LOW
            frames[t, top + r * cell : top + (r + 1) * cell, left + c * cell : left + (c + 1) * cell] = value
    return frames


def read_barcodes(video: Tensor, mask: Tensor | None = None) -> list[int]:
    """Frame indices encoded in a decoded clip (T, 3, R, R) (CLIP-normalised); only masked-in frames."""
    grey = denormalize(video).mean(dim=1)  # (T, R, R)
    R = grey.shape[-1]
    cell = R / GRID
    out = []
    for t in range(grey.shape[0]):
        if mask is not None and not mask[t]:
            continue
        value = 0
        for bit in range(GRID * GRID):
            r, c = divmod(bit, GRID)
            y0, y1 = int(r * cell + cell / 4), int((r + 1) * cell - cell / 4)
            x0, x1 = int(c * cell + cell / 4), int((c + 1) * cell - cell / 4)
            if grey[t, y0:y1, x0:x1].mean() > 0.5:
                value |= 1 << bit
        out.append(value)
    return out


def write_indexed_video(
    path: str | Path, n_frames: int, fps: float, height: int = HEIGHT, width: int = WIDTH
) -> Path:
    """A bar-coded video of ``n_frames`` frames at ``fps`` (container from the extension)."""
    return write_video(path, barcode_frames(n_frames, height, width), fps)


def write_corrupt_video(path: str | Path, seed: int = 0) -> Path:
    """A file with a video extension and random bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


@dataclass
class FixtureSet:
    """A built fixture: where it is and what a correct reader must find there."""

    data_path: Path
    features_path: Path
    expected: dict = field(default_factory=dict)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_msrvtt_fixture(root: str | Path, captions_per_video: int = 3) -> FixtureSet:
    """MSR-VTT layout with 6 train videos (9k csv), 4 in the 7k csv, 3 test videos.

    Awkward cases: ``video2`` exists only as ``.webm``; ``video3`` is 2 s long (2 frames);
    ``video4`` is 29.97 fps (4 s, 120 frames); ``video5`` is in the train csv but not on disk;
    ``video8`` (test) is corrupt; ``video9`` has captions but is in no csv.
    Normal videos: 6 s at 5 fps (30 frames: CLIP4Clip reads frames 0, 5, ..., 25).
    """
    root = Path(root)
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for i in (0, 1, 6, 7):
        write_indexed_video(videos / f"video{i}.mp4", 30, 5)
    write_indexed_video(videos / "video2.webm", 30, 5)
    write_indexed_video(videos / "video3.mp4", 10, 5)
    write_indexed_video(videos / "video4.mp4", 120, 30000 / 1001)
    write_corrupt_video(videos / "video8.mp4")
    all_ids = [f"video{i}" for i in range(10)]
    split_of = {v: ("test" if v in ("video6", "video7", "video8") else "train") for v in all_ids}
    data = {
        "info": {"contributor": "fixture", "data_created": "2016-04-01 12:00:00", "version": "1.0", "year": "2016"},
        "videos": [
            {"category": i % 20, "url": f"https://www.youtube.com/watch?v=fixture{i}", "video_id": v,
             "start time": 0.0, "end time": 6.0, "split": split_of[v], "id": i}
            for i, v in enumerate(all_ids)
        ],
        "sentences": [],
    }
    # sentences interleaved across videos, as in the real file (not grouped by video)
    for k in range(captions_per_video):
        for v in all_ids:
            data["sentences"].append({"caption": f"caption {k} of {v}", "video_id": v, "sen_id": len(data["sentences"])})
    with open(root / "MSRVTT_data.json", "w", encoding="utf-8") as f:
        json.dump(data, f)
    train9k = [f"video{i}" for i in range(6)]
    _write_csv(root / "MSRVTT_train.9k.csv", ["video_id"], [[v] for v in train9k])
    _write_csv(root / "MSRVTT_train.7k.csv", ["video_id"], [[v] for v in train9k[:4]])
    test = ["video6", "video7", "video8"]
    _write_csv(
        root / "MSRVTT_JSFUSION_test.csv",
        ["key", "vid_key", "video_id", "sentence"],
        [[f"ret{k}", f"msr{v[5:]}", v, f"test sentence for {v}"] for k, v in enumerate(test)],
    )
    expected = {
        "train_videos": 6,
        "train_captions": 6 * captions_per_video,
        "train_missing": ["video5"],
        "test_videos": 3,
        "webm": "video2",
        "short": "video3",
        "ntsc": "video4",
        "corrupt": "video8",
    }
    return FixtureSet(root, videos, expected)


def make_didemo_fixture(root: str | Path) -> FixtureSet:
    """DiDeMo layout; videos under nested folders of ``root/videos``.

    train: ``a@N00_1.mov`` exact (a .mov file), ``b@N00_2.avi`` by stem (``b@N00_2.mp4`` on
    disk), ``c@N00_3.mov`` doubled extension (``c@N00_3.mov.mp4``), ``d@N00_4.m4v`` missing,
    ``e@N00_5.mp4`` listed without annotations; ``z@N00_9.mp4`` annotated but not listed.
    test: ``f@N00_6.mp4`` 40 s at 2 fps (the 0..31 s clip reads 32 frames), ``g@N00_7.mp4`` corrupt.
    val: ``h@N00_8.mp4``, 3 s at 2 fps (shorter than 31 s).
    """
    root = Path(root)
    videos = root / "videos"
    write_indexed_video(videos / "part1" / "a@N00_1.mov", 8, 2)
    write_indexed_video(videos / "part1" / "b@N00_2.mp4", 8, 2)
    write_indexed_video(videos / "part2" / "deeper" / "c@N00_3.mov.mp4", 8, 2)
    write_indexed_video(videos / "f@N00_6.mp4", 80, 2)
    write_corrupt_video(videos / "g@N00_7.mp4")
    write_indexed_video(videos / "h@N00_8.mp4", 6, 2)
    lists = {
        "train": ["a@N00_1.mov", "b@N00_2.avi", "c@N00_3.mov", "d@N00_4.m4v", "e@N00_5.mp4"],
        "val": ["h@N00_8.mp4"],
        "test": ["f@N00_6.mp4", "g@N00_7.mp4"],
    }
    descriptions = {
        "train": [
            ("a@N00_1.mov", "a dog runs "), ("b@N00_2.avi", "a cat sleeps"), ("a@N00_1.mov", " the dog stops"),
            ("c@N00_3.mov", "first"), ("c@N00_3.mov", "second"), ("d@N00_4.m4v", "gone"),
            ("z@N00_9.mp4", "not listed"), ("c@N00_3.mov", "third"),
        ],
        "val": [("h@N00_8.mp4", "short video")],
        "test": [("f@N00_6.mp4", "long video"), ("f@N00_6.mp4", "still long"), ("g@N00_7.mp4", "broken")],
    }
    root.mkdir(parents=True, exist_ok=True)
    for split, names in lists.items():
        (root / f"{split}_list.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
        data = [
            {"description": d, "times": [[k, k], [k, k + 1], [k, k], [k, k]], "video": v, "annotator": "x",
             "dl_link": f"https://example.invalid/{v}"}
            for k, (v, d) in enumerate(descriptions[split])
        ]
        with open(root / f"{split}_data.json", "w", encoding="utf-8") as f:
            json.dump(data, f)
    expected = {
        "train": {"videos": 4, "captions": 7, "found": 3, "missing": ["d@N00_4.m4v"],
                  "matched_by": {"exact": 1, "stem": 1, "stripped": 1}},
        "paragraphs": {"a@N00_1.mov": "a dog runs the dog stops", "c@N00_3.mov": "first second third"},
        "long": "f@N00_6.mp4",
        "corrupt": "g@N00_7.mp4",
    }
    return FixtureSet(root, videos, expected)


def make_activitynet_fixture(root: str | Path) -> FixtureSet:
    """ActivityNet Captions layout; videos nested under ``root/videos``.

    train: ``v_AAA`` as ``v_AAA.mp4``, ``v_BBB`` as ``BBB.mkv`` (no prefix), ``v_CCC`` missing,
    ``v_DDD`` listed in train_ids.json but absent from train.json.
    val_1: ``v_EEE`` as ``EEE.webm``, ``v_FFF`` as ``v_FFF.mp4``. Videos are 5 s at 3 fps;
    ``v_AAA`` has duration 5.2, so the clip is 0..6 s (frames 0, 3, 6, 9, 12).
    """
    root = Path(root)
    videos = root / "videos"
    write_indexed_video(videos / "a" / "v_AAA.mp4", 15, 3)
    write_indexed_video(videos / "b" / "BBB.mkv", 15, 3)
    write_indexed_video(videos / "EEE.webm", 15, 3)
    write_indexed_video(videos / "c" / "v_FFF.mp4", 15, 3)
    train = {
        "v_AAA": {"duration": 5.2, "timestamps": [[0, 2.5], [2.5, 5.2]], "sentences": [" A man walks in.", "  He sits\n down. "]},
        "v_BBB": {"duration": 4.0, "timestamps": [[0, 4.0]], "sentences": ["A woman cooks."]},
        "v_CCC": {"duration": 3.0, "timestamps": [[0, 3.0]], "sentences": ["Missing on disk."]},
        "v_ZZZ": {"duration": 3.0, "timestamps": [[0, 3.0]], "sentences": ["Not in the ids."]},
    }
    val = {
        "v_EEE": {"duration": 5.0, "timestamps": [[0, 5.0]], "sentences": ["A dog jumps."]},
        "v_FFF": {"duration": 4.5, "timestamps": [[0, 1.0], [1.0, 4.5]], "sentences": [" One.", " Two."]},
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, obj in (
        ("train.json", train), ("val_1.json", val),
        ("train_ids.json", ["v_AAA", "v_BBB", "v_CCC", "v_DDD"]), ("val_ids.json", ["v_EEE", "v_FFF"]),
    ):
        with open(root / name, "w", encoding="utf-8") as f:
            json.dump(obj, f)
    expected = {
        "train": {"videos": 3, "captions": 4, "found": 2, "missing": ["v_CCC"], "unmatched": ["v_DDD"],
                  "text": {"v_AAA": "A man walks in. He sits down."}},
        "val": {"videos": 2, "captions": 3, "found": 2},
    }
    return FixtureSet(root, videos, expected)


def fake_tokenize(max_words: int = 8):
    """A tokenizer stand-in: each word -> 1 + (sum of its bytes mod 1000), zero-padded to max_words."""

    def tokenize(texts: list[str]) -> Tensor:
        out = torch.zeros(len(texts), max_words, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [1 + sum(w.encode()) % 1000 for w in text.split()][:max_words]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    return tokenize


def make_msvd_fixture(root: str | Path) -> FixtureSet:
    """MSVD layout (CLIP4Clip's ``msvd_data.zip``): ``raw-captions.pkl``, ``{train,val,test}_list.txt``,
    videos ``root/MSVD_Videos/YouTubeClips/<id>.avi``; 3 s at 2 fps (6 frames) each.

    Awkward cases: ``-4wsuPCjDBc_5_15`` starts with a dash; ``mv.89_1_2`` has a dot in its id;
    ``ñandú_0_4`` has a non-ASCII id; captions are word lists (one is a plain string), some
    non-ASCII; ``gone_1_2`` (train) has captions but no file; ``nocap_3_4`` (train) is listed
    without captions; ``unlisted_9_9`` has captions and a file but is in no list; a ``notes.txt``
    sits among the videos. Test videos have 3, 1 and 4 captions (many captions per video).
    """
    import pickle

    root = Path(root)
    videos = root / "MSVD_Videos" / "YouTubeClips"
    on_disk = ["-4wsuPCjDBc_5_15", "0lh_UWF9ZP4_62_69", "mv.89_1_2", "ñandú_0_4", "val_vid_0_5", "t1_0_3",
               "t2_1_4", "t3_2_6", "unlisted_9_9"]
    for vid in on_disk:
        write_indexed_video(videos / f"{vid}.avi", 6, 2)
    (videos / "notes.txt").write_text("not a video\n", encoding="utf-8")
    captions = {
        "-4wsuPCjDBc_5_15": [["a", "man", "plays", "a", "guitar"], ["a", "café", "concert"], ["música", "en", "vivo"]],
        "0lh_UWF9ZP4_62_69": [["a", "dog", "swims"], ["the", "dog", "is", "in", "water"]],
        "mv.89_1_2": [["someone", "slices", "an", "onion"]],
        "ñandú_0_4": [["a", "bird", "runs"], ["ein", "vogel", "läuft", "schnell"]],
        "gone_1_2": [["never", "on", "disk"]],
        "nocap_3_4": [],
        "val_vid_0_5": [["a", "cat", "jumps"], ["the", "cat", "leaps"]],
        "t1_0_3": [["a", "woman", "sings"], ["she", "sings", "a", "song"], ["chanson", "française"]],
        "t2_1_4": "a plain string caption",
        "t3_2_6": [["cars", "race"], ["a", "race"], ["fast", "cars"], ["vroom"]],
        "unlisted_9_9": [["not", "in", "a", "list"]],
    }
    captions["t2_1_4"] = [captions["t2_1_4"]]
    with open(root / "raw-captions.pkl", "wb") as f:
        pickle.dump(captions, f)
    lists = {
        "train": ["-4wsuPCjDBc_5_15", "0lh_UWF9ZP4_62_69", "mv.89_1_2", "ñandú_0_4", "gone_1_2", "nocap_3_4"],
        "val": ["val_vid_0_5"],
        "test": ["t1_0_3", "t2_1_4", "t3_2_6"],
    }
    for split, ids in lists.items():
        (root / f"{split}_list.txt").write_text("\n".join(ids) + "\n\n", encoding="utf-8")
    expected = {
        "train": {"videos": 5, "captions": 9, "found": 4, "missing": ["gone_1_2"], "unmatched": ["nocap_3_4"],
                  "text": {"-4wsuPCjDBc_5_15": ["a man plays a guitar", "a café concert", "música en vivo"]}},
        "val": {"videos": 1, "captions": 2, "found": 1},
        "test": {"videos": 3, "captions": 8, "found": 3, "per_video": [3, 1, 4]},
    }
    return FixtureSet(root, root / "MSVD_Videos", expected)


LSMDC_CLIPS = {
    "ab": "0001_American_Beauty_00.00.51.926-00.00.54.129",
    "ab2": "0001_American_Beauty_00.01.02.000-00.01.05.500",
    "amelie": "0002_Amélie_00.00.10.000-00.00.12.000",
    "gone": "0003_Missing_Movie_00.00.01.000-00.00.02.000",
    "val1": "1004_Juno_00.00.20.100-00.00.22.900",
    "val2": "1004_Juno_00.00.30.000-00.00.31.000",
    "test1": "3001_21_JUMP_STREET_00.00.10.000-00.00.12.000",
    "test2": "3001_21_JUMP_STREET_00.00.20.000-00.00.22.000",
    "test3": "3002_30_MINUTES_OR_LESS_00.00.05.000-00.00.07.000",
}


def make_lsmdc_fixture(root: str | Path) -> FixtureSet:
    """LSMDC layout: the three tab-separated csv files, clips ``root/LSMDC_Videos/<movie>/<clip_id>.avi``,
    3 s at 2 fps each.

    Awkward cases: clip ids with dots and dashes; ``0001_American_Beauty_00.00.51.926-...`` has two
    sentences; a sentence holds a tab; a non-ASCII movie name and sentences; ``0003_Missing_Movie_...``
    is listed but not on disk; CRLF line endings and a blank last line in the training file.
    """
    root = Path(root)
    videos = root / "LSMDC_Videos"
    for key, clip in LSMDC_CLIPS.items():
        if key != "gone":
            movie = clip.rsplit("_", 1)[0]
            write_indexed_video(videos / movie / f"{clip}.avi", 6, 2)

    def line(key: str, sentence: str) -> str:
        times = "\t".join(["00.00.01.000", "00.00.02.000", "00.00.00.900", "00.00.02.100"])
        return f"{LSMDC_CLIPS[key]}\t{times}\t{sentence}"

    train = [line("ab", "SOMEONE looks at the café."), line("ab2", "He walks away\twith a tab."),
             line("ab", "SOMEONE smiles."), line("amelie", "SOMEONE sourit à la caméra."),
             line("gone", "Never on disk.")]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "LSMDC16_annos_training.csv").write_bytes(("\r\n".join(train) + "\r\n\r\n").encode("utf-8"))
    (root / "LSMDC16_annos_val.csv").write_text(
        "\n".join([line("val1", "SOMEONE opens a door."), line("val2", "A car drives by.")]) + "\n", encoding="utf-8")
    (root / "LSMDC16_challenge_1000_publictect.csv").write_text(
        "\n".join([line("test1", "Two officers run."), line("test2", "SOMEONE laughs."),
                   line("test3", "A pizza is delivered.")]) + "\n", encoding="utf-8")
    expected = {
        "train": {"videos": 4, "captions": 5, "found": 3, "missing": [LSMDC_CLIPS["gone"]],
                  "texts": ["SOMEONE looks at the café.", "He walks away\twith a tab.", "SOMEONE smiles.",
                            "SOMEONE sourit à la caméra.", "Never on disk."]},
        "val": {"videos": 2, "captions": 2, "found": 2},
        "test": {"videos": 3, "captions": 3, "found": 3},
    }
    return FixtureSet(root, videos, expected)
