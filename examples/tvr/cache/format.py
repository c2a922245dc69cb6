"""On-disk format of the feature cache: safetensors shards read by memory map, a JSON manifest.

Layout of a cache folder (one data set, one backbone, one frame rule)::

    manifest.json                      settings + per-split file lists (written by the main process)
    <split>/index.json                 clips (video id, file, start, end), texts, sample -> clip / text rows
    <split>/videos-00000.safetensors   "tokens" (n, T, 1+H*W, D) float16, "video_mask" (n, T) uint8,
                                       "clip_index" (n,) int64: clips [k * S, k * S + n) of the split
    <split>/texts-00000.safetensors    "text_feat" (m, D) float16, "text_ids" (m, L) int32,
                                       "text_index" (m,) int64: text rows [k * S', k * S' + m)

Shards are standard safetensors files (``safetensors.safe_open`` reads them), written here by a small
deterministic writer (sorted header keys, no timestamps) so that the same inputs always give the same
bytes; every shard goes to a temporary name first and is renamed when complete. Readers map the
data section with ``numpy.memmap``: a row costs one page-cache read, nothing is unpickled.
Tests: tests/examples/test_cache.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["FORMAT", "MANIFEST_NAME", "INDEX_NAME", "CacheMismatchError", "shard_name", "write_safetensors",
           "read_header", "open_memmap", "shard_rows", "write_json_atomic", "read_json", "sha256_file",
           "settings_diff", "format_diff"]

FORMAT = "muse-pyramid-tvr-cache/1"
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.json"

PathLike = Union[str, os.PathLike]

_DTYPES = {  # safetensors dtype code <-> numpy dtype
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "U8": np.dtype("u1"), "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}
_CODES = {v: k for k, v in _DTYPES.items()}


class CacheMismatchError(ValueError):
    """A cache built with other settings than the run's (the message names every differing field)."""


def shard_name(kind: str, index: int) -> str:
    """File name of shard `index` of `kind` ("videos" or "texts"): ``videos-00003.safetensors``."""
    return f"{kind}-{index:05d}.safetensors"


def _header_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Tuple[bytes, List[str]]:
    header: Dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}}
    offset = 0
    names = sorted(arrays)
    for name in names:
        arr = arrays[name]
        code = _CODES.get(arr.dtype)
        if code is None:
            raise TypeError(f"array {name!r} has dtype {arr.dtype}; the cache stores {sorted(_DTYPES)}")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors pads it
    return raw, names


def write_safetensors(path: PathLike, tensors: Mapping[str, Union[torch.Tensor, np.ndarray]],
                      metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write `tensors` as a safetensors file, atomically (temporary name, fsync, rename); returns its size.

    Deterministic: the same tensors and metadata always give the same bytes. A leftover temporary file
    of an interrupted write is overwritten.
    """
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
              for k, v in tensors.items()}
    header, names = _header_bytes(arrays, metadata or {})
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)))
            fh.write(header)
            for name in names:
                fh.write(memoryview(arrays[name].reshape(-1).view(np.uint8)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path.stat().st_size


def read_header(path: PathLike) -> Tuple[Dict[str, Any], int]:
    """`(header, data_start)` of a safetensors file; raises ValueError on a truncated / foreign file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (size {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{path} is truncated or damaged: header describes {8 + n + end} bytes, file has {size}")
    return header, 8 + n


def open_memmap(path: PathLike) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only `numpy.memmap` (nothing is read yet)."""
    header, start = read_header(path)
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        dtype, shape = _DTYPES[spec["dtype"]], tuple(spec["shape"])
        if end == begin:
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return out


def shard_rows(path: PathLike, key: str) -> Optional[int]:
    """Rows of tensor `key` in a complete shard, or None if the file is missing, damaged or foreign."""
    try:
        header, _ = read_header(path)
    except (OSError, ValueError):
        return None
    if header.get("__metadata__", {}).get("format") != FORMAT or key not in header:
        return None
    return int(header[key]["shape"][0])


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """JSON with sorted keys (deterministic), via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def settings_diff(cached: Mapping[str, Any], run: Mapping[str, Any],
                  keys: Optional[Iterable[str]] = None) -> List[Tuple[str, Any, Any]]:
    """`(field, cached value, run value)` for every field of `keys` (default: both dicts' keys) that differs.

    Values are compared after a JSON round trip, so tuples equal lists and int keys equal strings.
    """
    keys = sorted(set(cached) | set(run)) if keys is None else list(keys)
    norm = lambda v: json.loads(json.dumps(v, sort_keys=True))  # noqa: E731
    return [(k, cached.get(k), run.get(k)) for k in keys if norm(cached.get(k)) != norm(run.get(k))]


def format_diff(diff: List[Tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: cache {a!r}, run {b!r}" for k, a, b in diff)
