"""Process-group set-up for `torchrun` (one or many GPUs or nodes, or CPU processes) and data loaders.

`torchrun --nproc_per_node K examples/clip4clip_msrvtt.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
we then initialise NCCL on CUDA or gloo on CPU. A plain `python ...` run is a world of one process
and initialises nothing. Training loaders always use a `DistributedSampler` (with the explicit
world size and rank, so it also works without a process group): its shuffle order is a function
of (seed, epoch) only, which is what makes `--resume` exact.
Tests: tests/examples/test_distributed.py.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "per_process_batch", "make_loader",
           "barrier", "broadcast_object"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: `rank` of `world_size`, its `local_rank` and torch `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve_device(device: Optional[str], local_rank: int) -> torch.device:
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r} asked for CUDA, but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: Optional[str] = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Read torchrun's environment, pick the device and initialise the process group if world > 1.

    Args:
        device: "cpu", "cuda", "cuda:1", or None / "auto" (CUDA when available). Under torchrun each
            process uses `cuda:LOCAL_RANK`.
        timeout_minutes: collective timeout (evaluation of a large test set runs on every rank).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
        logger.info("initialised %s process group: rank %d of %d on %s", backend, rank, world_size, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Destroy the process group if one was initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to all processes (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def per_process_batch(global_batch: int, world_size: int, grad_accum: int = 1) -> int:
    """Per-process batch = global batch / world size; it must also split into `grad_accum` micro-batches."""
    if global_batch < 1 or world_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size, world size and grad_accum must be >= 1; got {global_batch}, "
                         f"{world_size}, {grad_accum}")
    if global_batch % world_size:
        raise ValueError(f"--batch_size {global_batch} (global) is not divisible by the world size {world_size}")
    local = global_batch // world_size
    if local % grad_accum:
        raise ValueError(f"per-process batch {local} (= --batch_size {global_batch} / world size {world_size}) "
                         f"is not divisible by --grad_accum {grad_accum}")
    return local


def make_loader(
    dataset: Dataset,
    batch_size: int,
    info: DistInfo,
    *,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
) -> DataLoader:
    """A loader whose `DistributedSampler` shards `dataset` over the processes.

    Training: shuffled by (seed, epoch) - call `loader.sampler.set_epoch(epoch)` - and the last
    incomplete batch dropped so every process has the same batch size. Evaluation: no shuffle,
    no drop; the sampler pads the last shard by repeating items, the caller de-duplicates by index.
    """
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=train,
                                 seed=seed, drop_last=train)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
        collate_fn=collate_fn,
    )
