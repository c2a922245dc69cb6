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
bytes; every shard goes to a temporary name unique to its writer first (two processes on one folder
never share one) and is renamed when complete. The manifest records each shard's size and sha256.
A header that does not describe a valid file raises `CacheShardError` naming the shard. Readers map the
data section with ``numpy.memmap``: a row costs one page-cache read, nothing is unpickled.
Tests: tests/examples/test_cache.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import struct
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["FORMAT", "MANIFEST_NAME", "INDEX_NAME", "CacheMismatchError", "CacheShardError", "shard_name", "write_safetensors",
           "read_header", "open_memmap", "remove_stale_temporaries", "shard_rows", "write_json_atomic", "read_json", "sha256_file",
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
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_TMP_OWNER = re.compile(r"\.([A-Za-z0-9_]+)-(\d+)-[0-9a-f]{12}\.tmp$")  # .<name>.<host>-<pid>-<random>.tmp


class CacheMismatchError(ValueError):
    """A cache built with other settings than the run's (the message names every differing field)."""


class CacheShardError(ValueError):
    """A cache shard that is missing, truncated, damaged or foreign (the message names the file)."""


def _damaged(path: Path, detail: str) -> CacheShardError:
    return CacheShardError(f"cache shard {path} is damaged ({detail}); rerun the cache command to repair it")


def _temporary(path: Path, mode: str):
    """A new temporary file beside `path`, named uniquely for this writer: `(file object, its path)`."""
    tmp = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")  # usual permissions
    return open(tmp, mode.replace("w", "x"), **({"encoding": "utf-8"} if "b" not in mode else {})), tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Delete the temporary files in `folder` left by killed writers: those of a process of this host that
    no longer runs, and unnamed ones of older versions. Files of live writers (any host) are kept."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        m = _TMP_OWNER.search(tmp.name)
        if m is None or (m.group(1) == _HOST and not _alive(int(m.group(2)))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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

    Deterministic: the same tensors and metadata always give the same bytes. The temporary file has a
    name unique to this call, so concurrent writers of the same shard do not collide.
    """
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
              for k, v in tensors.items()}
    header, names = _header_bytes(arrays, metadata or {})
    fh, tmp = _temporary(path, "wb")
    try:
        with fh:
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
    """`(header, data_start)` of a safetensors file; `CacheShardError` naming the file when it is truncated,
    damaged or foreign (every tensor entry is checked: dtype, shape, offsets inside the data section)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise _damaged(path, f"not a safetensors file: {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise _damaged(path, f"not a safetensors file: header length {n}, file size {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise _damaged(path, f"header is a JSON {type(header).__name__}, not an object")
    end = 0
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict):
                raise _damaged(path, "__metadata__ is not an object")
            continue
        if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES:
            raise _damaged(path, f"tensor {name!r}: no known dtype in {spec!r:.80}")
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _damaged(path, f"tensor {name!r}: shape {shape!r:.80}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _damaged(path, f"tensor {name!r}: data_offsets {offsets!r:.80}")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPES[spec["dtype"]].itemsize:
            raise _damaged(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape}")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise _damaged(path, f"truncated or extended: the header describes {8 + n + end} bytes, the file has {size}")
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
    except (OSError, CacheShardError):
        return None
    if header.get("__metadata__", {}).get("format") != FORMAT or key not in header:
        return None
    return int(header[key]["shape"][0])


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """JSON with sorted keys (deterministic), via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh, tmp = _temporary(path, "w")
    try:
        with fh:
            json.dump(obj, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: PathLike) -> Any:
    """Parse a JSON file of the cache; ValueError naming it when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the cache is damaged: rerun the cache command, or "
                         "build it again in a new cache_dir") from err


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
