"""Search your own videos: an incremental index of video embeddings and exact cosine search in PyTorch.

Index folder layout (`VideoIndex`):

    manifest.json     format, the model that made the embeddings (source, path, sha256, head, frame rule,
                      max_words, width D), the search backend, and one entry per video: path, duration,
                      sha256 checksum, size, mtime, frames read, embedding row, thumbnail
    embeddings.npy    (N, D) float32, L2-normalised, row i = entry i (plain numpy, no pickle)
    thumbs/<sha>.jpg  a strip of up to 4 of the frames the model saw, for `--html` result pages

Each video is decoded once with the training frame rule (`video.decode_frames`): the same frames give
the model input and the thumbnails. Indexing again the same folder embeds only new or changed files
(size and mtime unchanged: skipped without reading; otherwise the checksum decides), follows moved
files by checksum and drops entries of files that disappeared from the folder. The index refuses to
mix models: a different checkpoint needs a new index folder (or `rebuild=True`).

Search is exact: `(Q, D) @ (D, N)` and `topk` (`ExactCosine`). Memory: the embeddings take
`N * D * 4` bytes, 20.5 MB per 10,000 videos at D = 512 (ViT-B), plus the manifest (about 0.3 KB per
video on disk). Backends are looked up by the name stored in the manifest (`BACKENDS`), so a vector
index library (FAISS, hnswlib, ...) can be added as another `SearchBackend` without changing the
folder format. Shape letters: N indexed videos, Q queries, D embedding width.
Tests: tests/examples/test_search.py.
"""

from __future__ import annotations

import html
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Type

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .cache.format import read_json, sha256_file, write_json_atomic
from .data.base import list_video_files
from .model import CLIP4Clip
from .video import FrameConfig

__all__ = ["INDEX_FORMAT", "SearchBackend", "ExactCosine", "BACKENDS", "IndexEntry", "VideoIndex", "ModelSource",
           "load_search_model", "write_results_page", "bytes_per_video"]

logger = logging.getLogger(__name__)

INDEX_FORMAT = "muse-pyramid-video-index/1"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
THUMBS = "thumbs"


def bytes_per_video(dim: int) -> int:
    """Bytes of memory one indexed video takes in search (its float32 embedding)."""
    return 4 * dim


# ------------------------------------------------------------------------------ search backends
class SearchBackend(Protocol):
    """What the index needs from a vector search: built from all rows, asked for the top-k of queries."""

    def __init__(self, vectors: torch.Tensor) -> None: ...

    def search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """`queries (Q, D)` -> `(scores (Q, k), rows (Q, k))`, best first."""
        ...


class ExactCosine:
    """Exact cosine search: one matrix product and `topk` (rows and queries are L2-normalised).

    Args:
        vectors: `(N, D)` L2-normalised embeddings (kept as float32 on `device`).
        device: where the product runs.
    """

    def __init__(self, vectors: torch.Tensor, device: str | torch.device = "cpu") -> None:
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be (N, D), got shape {tuple(vectors.shape)}")
        self.vectors = vectors.float().to(device)

    def search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if queries.ndim != 2 or queries.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries must be (Q, {self.vectors.shape[1]}), got shape {tuple(queries.shape)}")
        scores = queries.float().to(self.vectors.device) @ self.vectors.t()  # (Q, N)
        return scores.topk(min(k, self.vectors.shape[0]), dim=1)


#: Search backends by the name stored in the manifest (`"backend"`).
BACKENDS: Dict[str, Type] = {"exact": ExactCosine}


# ------------------------------------------------------------------------------ model
@dataclass
class ModelSource:
    """Which model made an index's embeddings, and how it reads videos and text."""

    source: str  # "checkpoint" (the pipeline's) or "clip" (CLIP alone, meanP: the zero-shot baseline)
    path: str  # the checkpoint, or CLIP's weights file
    sha256: str  # of that file
    sim_header: str
    dim: int
    max_frames: int
    feature_framerate: int
    slice_framepos: int
    image_resolution: int
    max_words: int

    def frames(self) -> FrameConfig:
        return FrameConfig(max_frames=self.max_frames, feature_framerate=self.feature_framerate,
                           slice_framepos=self.slice_framepos, image_resolution=self.image_resolution)


#: Frame rule and text length when neither the checkpoint nor a flag gives them (MSR-VTT's recipe).
_DEFAULT_RULE = {"max_frames": 12, "feature_framerate": 1, "slice_framepos": 2, "max_words": 32}


def load_search_model(checkpoint: Optional[str] = None, clip: Optional[str] = None, *,
                      clip_weights_dir: Optional[str] = None, device: str | torch.device = "cpu",
                      expect_sha256: Optional[str] = None, **rule: Optional[int]) -> Tuple[CLIP4Clip, ModelSource]:
    """The model an index is built or searched with, in eval mode on `device`, and its `ModelSource`.

    Args:
        checkpoint: our pipeline's `model_best.pt` / `checkpoint_last.pt` (head and frame rule read from it).
        clip: instead, CLIP alone with meanP pooling (zero-shot baseline): "ViT-B/32" (OpenAI's file in
            `clip_weights_dir` / $MUSE_PYRAMID_CLIP_DIR) or a path to OpenAI-layout weights.
        expect_sha256: the file must have this checksum (an existing index's model).
        rule: `max_frames`, `feature_framerate`, `slice_framepos`, `max_words`; None keeps the checkpoint's
            value (or MSR-VTT's recipe for CLIP alone).
    """
    from .build import build_model_from_state, load_model_state
    from .checkpoint import load_checkpoint
    from .model import build_clip, build_model, clip_context_length, clip_embed_dim, clip_image_size

    if (checkpoint is None) == (clip is None):
        raise ValueError("give exactly one of checkpoint (the pipeline's) or clip (CLIP alone, meanP)")
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        state, config = load_model_state(str(path))
        if config is None:
            raise ValueError(f"{path} holds no model_config (not written by this pipeline): evaluate it with the "
                             "pipeline's --do_eval, or pass --clip for CLIP alone")
        saved = load_checkpoint(path).get("args") or {}
        model = build_model_from_state(state, config)
        values = {k: saved.get(k, config.get(k, v)) for k, v in _DEFAULT_RULE.items()}
    else:
        from muse_pyramid.backbones import resolve_openai_weights

        path = resolve_openai_weights(clip, clip_weights_dir)
        model = build_model(build_clip(str(path)), sim_header="meanP")
        values = dict(_DEFAULT_RULE)
    values.update({k: int(v) for k, v in rule.items() if v is not None})
    values["max_words"] = min(int(values["max_words"]), clip_context_length(model.clip))
    digest = sha256_file(path)
    if expect_sha256 is not None and digest != expect_sha256:
        raise ValueError(f"{path} changed since the index was built (sha256 {digest[:12]}..., index "
                         f"{expect_sha256[:12]}...): its embeddings would not match; rebuild the index")
    source = ModelSource(source="checkpoint" if checkpoint is not None else "clip", path=str(path.resolve()),
                         sha256=digest, sim_header=model.sim_header, dim=clip_embed_dim(model.clip),
                         image_resolution=clip_image_size(model.clip), **{k: int(v) for k, v in values.items()})
    return model.to(device).eval(), source


# ------------------------------------------------------------------------------ decoding
class _DecodeVideos(Dataset):
    """Decode each file once: the model input and the thumbnail strip come from the same frames."""

    def __init__(self, paths: Sequence[Path], frames: FrameConfig, n_thumbs: int = 4, thumb_size: int = 112):
        self.paths, self.frames, self.n_thumbs, self.thumb_size = list(paths), frames, n_thumbs, thumb_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        from PIL import Image

        from .video import VideoDecodeError, decode_frames, frames_to_tensor, select_frames, video_duration

        path = self.paths[i]
        try:
            images = decode_frames(path, self.frames)
            duration = video_duration(path)
        except VideoDecodeError as err:
            return {"i": i, "error": err.reason}
        video, mask = frames_to_tensor(images, self.frames.max_frames)
        picks = [images[k] for k in select_frames(len(images), self.n_thumbs, 2)]
        if images.shape[1] > self.thumb_size:
            picks = [np.asarray(Image.fromarray(p).resize((self.thumb_size, self.thumb_size), Image.BICUBIC))
                     for p in picks]
        return {"i": i, "error": None, "video": video, "video_mask": mask, "duration": duration,
                "n_frames": len(images), "thumb": np.concatenate(picks, axis=1)}


# ------------------------------------------------------------------------------ the index
@dataclass
class IndexEntry:
    """One indexed video (a row of `embeddings.npy`, in entry order)."""

    path: str  # absolute
    duration: Optional[float]  # seconds, from the container header
    checksum: str  # "sha256:<hex>" of the file's bytes
    size: int
    mtime_ns: int
    n_frames: int  # frames the model saw
    thumb: str  # relative to the index folder


class VideoIndex:
    """Embeddings of a set of videos and their manifest (see the module docstring).

    Create or open with `VideoIndex.open(folder)`; `update(...)` embeds new files; `search(...)` ranks.
    """

    def __init__(self, folder: str | os.PathLike, model: Optional[Mapping[str, Any]] = None,
                 entries: Optional[List[IndexEntry]] = None, vectors: Optional[torch.Tensor] = None,
                 backend: str = "exact") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; known: {sorted(BACKENDS)}")
        self.folder = Path(folder)
        self.model = dict(model) if model is not None else None
        self.entries: List[IndexEntry] = list(entries or [])
        dim = int(self.model["dim"]) if self.model else 0
        self.vectors = vectors if vectors is not None else torch.zeros(0, dim)
        self.backend = backend
        self.failed: Dict[str, str] = {}
        if self.vectors.shape[0] != len(self.entries):
            raise ValueError(f"{len(self.entries)} entries but {self.vectors.shape[0]} embedding rows")

    # -------------------------------------------------------------- storage
    @classmethod
    def open(cls, folder: str | os.PathLike, *, must_exist: bool = False) -> VideoIndex:
        """Read the index at `folder`; an empty index when there is none (FileNotFoundError if `must_exist`)."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            if must_exist:
                raise FileNotFoundError(f"no video index at {folder} ({path} does not exist); build one with "
                                        "`python examples/search.py index <videos> --checkpoint ...`")
            return cls(folder)
        manifest = read_json(path)
        if manifest.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {INDEX_FORMAT!r}")
        entries = [IndexEntry(**e) for e in manifest["entries"]]
        vectors = torch.from_numpy(np.load(folder / EMBEDDINGS, allow_pickle=False)) if entries else None
        index = cls(folder, manifest["model"], entries, vectors, manifest.get("backend", "exact"))
        index.failed = dict(manifest.get("failed", {}))
        return index

    def save(self) -> None:
        """Embeddings first, then the manifest, each through a temporary file and a rename."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{EMBEDDINGS}.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, self.vectors.float().numpy(), allow_pickle=False)
        os.replace(tmp, self.folder / EMBEDDINGS)
        write_json_atomic(self.folder / MANIFEST, {
            "format": INDEX_FORMAT, "model": self.model, "backend": self.backend,
            "n_videos": len(self.entries), "dim": int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0,
            "entries": [asdict(e) for e in self.entries], "failed": self.failed,
        })

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def memory_bytes(self) -> int:
        """Bytes the embeddings take in memory during search."""
        return self.vectors.numel() * 4

    # -------------------------------------------------------------- indexing
    def update(self, videos: str | os.PathLike, model: CLIP4Clip, source: ModelSource, *, batch_size: int = 8,
               num_workers: int = 0, rebuild: bool = False, progress: bool = True,
               on_decode: Optional[Callable[[Path], None]] = None) -> Dict[str, Any]:
        """Bring the index up to date with the video files under `videos` (recursive); saves it.

        Args:
            videos: a folder of video files.
            model, source: from `load_search_model`; must be the index's model unless `rebuild`.
            rebuild: drop every entry first (e.g. to change the model).
            on_decode: called with each path before it is decoded (tests count decodes with it).

        Returns:
            counts `added`, `changed`, `moved`, `unchanged`, `removed`, `failed` and the `failures`
            (path -> reason).
        """
        from tqdm.auto import tqdm

        folder = Path(videos).expanduser().resolve()
        files = list_video_files(folder)
        new_model = asdict(source)
        if rebuild or self.model is None:
            self.entries, self.vectors, self.failed, self.model = [], torch.zeros(0, source.dim), {}, new_model
        elif any(self.model.get(k) != v for k, v in new_model.items() if k != "path"):  # the file may move
            differ = sorted(k for k in new_model if k != "path" and self.model.get(k) != new_model[k])
            raise ValueError(f"the index at {self.folder} was built with another model or frame rule ({', '.join(differ)} "
                             "differ): index into a new folder, or rebuild it")
        by_path = {e.path: i for i, e in enumerate(self.entries)}
        by_sum = {e.checksum: i for i, e in enumerate(self.entries)}
        keep: Dict[int, IndexEntry] = {}  # old row -> its (possibly updated) entry
        copies: List[Tuple[int, IndexEntry]] = []  # a file identical to an indexed one: same embedding
        todo: List[Tuple[Path, str, os.stat_result]] = []
        counts = dict(added=0, changed=0, moved=0, unchanged=0, removed=0, failed=0)
        for f in files:
            st, key = f.stat(), str(f)
            old = self.entries[by_path[key]] if key in by_path else None
            if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
                keep[by_path[key]] = old
                counts["unchanged"] += 1
                continue
            checksum = f"sha256:{sha256_file(f)}"
            if old is not None and old.checksum == checksum:
                keep[by_path[key]] = IndexEntry(**{**asdict(old), "mtime_ns": st.st_mtime_ns})
                counts["unchanged"] += 1
            elif old is None and checksum in by_sum:
                row = by_sum[checksum]
                entry = IndexEntry(**{**asdict(self.entries[row]), "path": key, "size": st.st_size,
                                      "mtime_ns": st.st_mtime_ns})
                if row not in keep and not Path(self.entries[row].path).is_file():
                    keep[row] = entry
                    counts["moved"] += 1
                else:
                    copies.append((row, entry))
                    counts["added"] += 1
            else:
                todo.append((f, checksum, st))
        listed = {str(f) for f in files}
        rows = []
        for i, e in enumerate(self.entries):
            if i in keep:
                rows.append(i)
            elif e.path in listed:  # changed: re-embedded below
                continue
            elif Path(e.path).is_relative_to(folder) or not Path(e.path).is_file():
                counts["removed"] += 1  # the file is gone
            else:
                rows.append(i)  # a video of another folder of this index
        entries = [keep.get(i, self.entries[i]) for i in rows] + [e for _, e in copies]
        rows += [i for i, _ in copies]
        vectors = [self.vectors[rows]] if rows else []

        self.failed = {p: r for p, r in self.failed.items() if p not in listed}
        if todo:
            frames = source.frames()
            dataset = _DecodeVideos([t[0] for t in todo], frames)
            if on_decode is not None:
                for t in todo:
                    on_decode(t[0])
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
            device = next(model.parameters()).device
            thumbs = self.folder / THUMBS
            thumbs.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            for batch in tqdm(loader, desc="indexing", disable=not progress, leave=False, dynamic_ncols=True):
                good = [b for b in batch if b["error"] is None]
                for b in batch:
                    if b["error"] is not None:
                        path = str(todo[b["i"]][0])
                        self.failed[path] = b["error"]
                        counts["failed"] += 1
                        logger.warning("cannot index %s: %s", path, b["error"])
                if not good:
                    continue
                with torch.no_grad():
                    emb = model.encode_video(torch.stack([b["video"] for b in good]).to(device),
                                             torch.stack([b["video_mask"] for b in good]).to(device))
                vectors.append(emb.float().cpu())
                for b in good:
                    path, checksum, st = todo[b["i"]]
                    counts["changed" if str(path) in by_path else "added"] += 1
                    thumb = f"{THUMBS}/{checksum.split(':', 1)[1][:20]}.jpg"
                    Image.fromarray(b["thumb"]).save(self.folder / thumb, quality=85)
                    entries.append(IndexEntry(path=str(path), duration=b["duration"], checksum=checksum,
                                              size=st.st_size, mtime_ns=st.st_mtime_ns, n_frames=b["n_frames"],
                                              thumb=thumb))
        self.entries = entries
        self.vectors = torch.cat(vectors) if vectors else torch.zeros(0, source.dim)
        self.save()
        counts.update(failures=dict(self.failed), total=len(self.entries))
        return counts

    # -------------------------------------------------------------- search
    def search(self, queries: torch.Tensor, k: int = 10) -> List[List[Tuple[IndexEntry, float]]]:
        """Top-`k` entries and cosine scores for each of `queries (Q, D)` (L2-normalised text embeddings)."""
        if not self.entries:
            raise ValueError(f"the index at {self.folder} is empty")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, rows = BACKENDS[self.backend](self.vectors).search(queries, k)
        return [[(self.entries[int(r)], float(s)) for s, r in zip(srow, rrow)] for srow, rrow in zip(scores, rows)]


def encode_queries(model: CLIP4Clip, source: ModelSource, texts: Sequence[str]) -> torch.Tensor:
    """`(Q, D)` L2-normalised text embeddings of `texts` with the index's tokenizer length."""
    from .build import make_tokenizer

    device = next(model.parameters()).device
    with torch.no_grad():
        return model.encode_text(make_tokenizer(source.max_words)(list(texts)).to(device)).float().cpu()


def write_results_page(path: str | os.PathLike, index: VideoIndex,
                       results: Sequence[Tuple[str, List[Tuple[IndexEntry, float]]]]) -> Path:
    """A small HTML page of search results with keyframe strips (paths relative to the page; no network)."""
    from .report import IMAGE_CHECK_SCRIPT

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()

    def rel(target: Path) -> str:
        return html.escape(Path(os.path.relpath(target.resolve(), base)).as_posix())

    blocks = []
    for query, hits in results:
        rows = "".join(
            f'<li class="hit" data-path="{html.escape(e.path)}" data-rank="{i + 1}">'
            f'<img src="{rel(index.folder / e.thumb)}" alt="{html.escape(Path(e.path).name)}">'
            f'<span>{i + 1}. <b>{score:.3f}</b> <a href="{rel(Path(e.path))}">{html.escape(Path(e.path).name)}</a>'
            f'{f" ({e.duration:.1f} s)" if e.duration else ""}</span></li>'
            for i, (e, score) in enumerate(hits))
        blocks.append(f'<section class="query" data-query="{html.escape(query)}"><h2>“{html.escape(query)}”</h2>'
                      f"<ol>{rows}</ol></section>")
    model = index.model or {}
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>video search</title><style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
ol {{ list-style: none; padding: 0; }} li.hit {{ display: flex; align-items: center; gap: 0.8em; margin: 0.4em 0; }}
li.hit img {{ height: 64px; image-rendering: pixelated; }}
</style></head><body>
<p>{len(index)} videos indexed with {html.escape(str(model.get("sim_header", "?")))} ({html.escape(str(model.get("path", "")))});
scores are cosine similarities. Written {time.strftime("%Y-%m-%d %H:%M")}.</p>
{"".join(blocks)}
{IMAGE_CHECK_SCRIPT}
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path
