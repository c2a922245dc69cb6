"""Two gloo processes train exactly like one process on the global batch (examples/tvr/distributed.py,
loss.py, train.py), and the loaders / batch split behave."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tvr.distributed import DistInfo, init_distributed, make_loader, per_process_batch
from tvr.train import train_step

from tests.examples._pipeline_utils import (
    TINY_CLIP,
    ddp_grad_worker,
    make_tiny_msrvtt,
    random_batch,
    tiny_model,
)

ROOT = Path(__file__).resolve().parents[2]


def _single_process(seed: int, batch: int, grad_accum: int):
    model = tiny_model("MUSE", seed=seed, dropout=0.0)
    loss = train_step(model, random_batch(torch.Generator().manual_seed(seed), batch=batch), grad_accum=grad_accum)
    return loss, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.slow
def test_two_gloo_processes_match_single_process_on_global_batch(tmp_path):
    seed, world = 7, 2
    mp.spawn(ddp_grad_worker, args=(world, str(tmp_path / "init"), str(tmp_path), seed), nprocs=world, join=True)
    ref_loss, ref_grads = _single_process(seed, 4 * world, grad_accum=1)
    assert len(ref_grads) > 20
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for accum in (1, 2):
            torch.testing.assert_close(got[accum]["loss"], ref_loss, rtol=1e-5, atol=1e-6)
            for name, grad in ref_grads.items():
                torch.testing.assert_close(got[accum]["grads"][name], grad, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, n=name, a=accum: f"{n} (grad_accum {a}): {m}")


def test_gradient_caching_equals_one_pass():
    loss1, grads1 = _single_process(3, 8, grad_accum=1)
    loss4, grads4 = _single_process(3, 8, grad_accum=4)
    torch.testing.assert_close(loss4, loss1)
    for name in grads1:
        torch.testing.assert_close(grads4[name], grads1[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_per_process_batch():
    assert per_process_batch(128, 8) == 16
    assert per_process_batch(128, 2, grad_accum=4) == 64
    with pytest.raises(ValueError, match="not divisible by the world size"):
        per_process_batch(130, 8)
    with pytest.raises(ValueError, match="grad_accum"):
        per_process_batch(12, 2, grad_accum=4)


def test_training_loader_shards_and_reshuffles_per_epoch():
    data = list(range(20))
    shards = []
    for rank in range(2):
        loader = make_loader(data, 3, DistInfo(rank=rank, world_size=2), train=True, seed=5)
        loader.sampler.set_epoch(0)
        epoch0 = [int(x) for b in loader for x in b]
        loader.sampler.set_epoch(0)
        assert [int(x) for b in loader for x in b] == epoch0  # a function of (seed, epoch) only
        loader.sampler.set_epoch(1)
        assert [int(x) for b in loader for x in b] != epoch0
        assert all(len(b) == 3 for b in loader)  # last incomplete batch dropped
        shards.append(set(epoch0))
    assert not shards[0] & shards[1]


def test_single_process_init_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_end_to_end(tmp_path):
    import json

    data = make_tiny_msrvtt(tmp_path / "data", n_train=8, n_test=4)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "clip4clip_msrvtt.py"), "--do_train", "--data_path", str(data.root),
           "--features_path", str(data.features_path), "--output_dir", str(out), "--small_clip",
           json.dumps(TINY_CLIP), "--max_frames", "3", "--max_words", "12", "--batch_size", "4",
           "--batch_size_val", "2", "--epochs", "1", "--num_workers", "0", "--muse_depth", "1", "--muse_d_state",
           "4", "--no_progress", "--device", "cpu"]
    # two threads: torch's CPU convolutions take the oneDNN path, where a plain 1x1 Conv2d in the pyramid returned
    # channels-last weight gradients and DDP warned "Grad strides do not match bucket view strides"
    env = {**os.environ, "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this checkout's library
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in stderr
    assert stderr.count("msrvtt/train: 8 videos") == 1  # logged by rank 0 only
    assert stderr.count("initialised gloo process group") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["n_videos"] == 4 and results["history"][0]["step"] == 4  # 16 samples / global 4
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
