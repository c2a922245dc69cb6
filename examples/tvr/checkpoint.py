"""Training checkpoints: written atomically every epoch, read back with `weights_only=True`.

A checkpoint holds only tensors and plain containers of primitives (so the safe loader accepts it):
model, optimizer, scheduler and grad-scaler states, the RNG states of python / numpy / torch / CUDA
(as tensors and lists), the epoch and step counters, the best validation score so far, the head's
config and the run's arguments. Resuming from the checkpoint of epoch e restores every RNG, so the
next epochs draw exactly what an uninterrupted run would have drawn.

A new `checkpoint_last.pt` is written completely (temporary file, fsync, rename) before the previous
one is moved to `checkpoint_prev.pt`, so a run killed at any moment leaves at least one complete
checkpoint; `load_training_checkpoint` falls back to the previous one (saying so) when the latest is
damaged. A file that is not a checkpoint, or not of the kind asked for, raises `CheckpointError`
naming the file.
Tests: tests/examples/test_checkpoint.py, tests/examples/test_guards.py.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "save_atomic", "load_checkpoint", "to_plain",
           "model_state_dict", "load_training_checkpoint", "CheckpointError", "CHECKPOINT_NAME", "PREV_NAME",
           "BEST_NAME", "TRAINING_KEYS"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint_last.pt"  # full training state, rewritten every epoch
PREV_NAME = "checkpoint_prev.pt"  # the one before it, kept until the next one is complete
BEST_NAME = "model_best.pt"  # weights + configs of the epoch with the best validation score

PathLike = Union[str, os.PathLike]

#: What `checkpoint_last.pt` holds besides the weights; `--resume` needs all of them.
TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step")


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint, or one of another kind than asked for."""


def to_plain(obj: Any) -> Any:
    """Recursively turn paths, tuples' contents, numpy scalars/arrays and dataclass-free objects into
    primitives / tensors that `torch.load(weights_only=True)` accepts."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (int, str)) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    raise TypeError(f"cannot store a {type(obj).__name__} in a weights_only checkpoint: {obj!r}")


def capture_rng_state() -> Dict[str, Any]:
    """The python, numpy, torch and (if present) CUDA RNG states as tensors and lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of `model`, unwrapping DDP (no `module.` prefix)."""
    return getattr(model, "module", model).state_dict()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Mapping[str, Any], path: PathLike, keep_previous: Optional[PathLike] = None) -> Path:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`.

    A run killed while saving leaves the previous checkpoint intact. Refuses objects that the
    `weights_only` loader would reject (checked before anything is written). With `keep_previous`,
    the file `path` held is moved there once the new one is completely written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = to_plain(obj)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(plain, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous is not None and path.is_file():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: PathLike, map_location: Optional[Union[str, torch.device]] = "cpu") -> Dict[str, Any]:
    """`torch.load(path, weights_only=True)`; a missing file raises FileNotFoundError naming it, a file
    that is not a (complete) checkpoint dict raises `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, AttributeError, KeyError,
            IndexError, TypeError) as err:
        detail = " ".join(str(err).split())
        if isinstance(err, pickle.UnpicklingError):  # torch's text suggests weights_only=False: not here
            detail = detail.split(" In PyTorch 2.6")[0]
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated, damaged, another format, "
                              f"or objects that weights-only loading refuses): {type(err).__name__}: "
                              f"{detail[:200]}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict (a state dict or a "
                              "training checkpoint)")
    return obj


def _check_training(obj: Mapping[str, Any], path: Path) -> None:
    missing = [k for k in TRAINING_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {missing}); --resume takes the "
                              f"{CHECKPOINT_NAME} of a run (model weights go to --init_model)")
    if not all(isinstance(obj[k], Mapping) for k in ("model", "optimizer", "scheduler", "scaler")):
        raise CheckpointError(f"{path} is damaged: its model / optimizer / scheduler / scaler states are not dicts")


def load_training_checkpoint(path: PathLike, map_location: Optional[Union[str, torch.device]] = "cpu"
                             ) -> Tuple[Dict[str, Any], Path]:
    """The training checkpoint `path` (for `--resume`), or the `checkpoint_prev.pt` beside it when `path` is
    a run's `checkpoint_last.pt` that is missing or damaged (logged as a warning). Any other file that is
    not a training checkpoint (`--resume model_best.pt`) is an error. Returns `(checkpoint, the path read)`."""
    path = Path(path)
    prev = path.with_name(PREV_NAME)
    try:
        obj = load_checkpoint(path, map_location)
        _check_training(obj, path)
        return obj, path
    except (CheckpointError, FileNotFoundError) as err:
        if path.name != CHECKPOINT_NAME or not prev.is_file():
            raise
        failure = err
    obj = load_checkpoint(prev, map_location)
    _check_training(obj, prev)
    logger.warning("%s; falling back to the previous checkpoint %s (epoch %d): the last epoch is trained again",
                   failure, prev, int(obj["epoch"]) + 1)
    return obj, prev
