"""MUSE inside CLIP4Clip's own code: `docs/patches/clip4clip.patch` applied to a pristine copy.

The pristine CLIP4Clip (ArrowLuo/CLIP4Clip at 508ffa3) lies in `../shared/third_party/CLIP4Clip`. It
is copied to a temporary folder and patched there; everything below runs CLIP4Clip's functions
(`get_args`, `init_model` -> `CLIP4Clip.from_pretrained`, `prep_optimizer` with its `BertAdam`,
`train_epoch`, `get_sequence_visual_output`, `get_similarity_logits`, `eval_epoch`), with a small random
CLIP written where CLIP4Clip looks for `ViT-B-32.pt` (it reads the architecture from the shapes).

Two CPU-only adaptations, outside CLIP4Clip's files: its module-level `init_process_group("nccl")`
runs on gloo, and `DistributedDataParallel` is built without `device_ids` (CPU modules take none).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from muse_pyramid.head import InitOverwrittenWarning

ROOT = Path(__file__).resolve().parents[2]
PRISTINE = ROOT.parent / "shared" / "third_party" / "CLIP4Clip"
PATCH = ROOT / "docs" / "patches" / "clip4clip.patch"
HOST_MODULES = ("modules", "dataloaders", "main_task_retrieval", "metrics", "util")

pytestmark = pytest.mark.skipif(
    not PRISTINE.is_dir(), reason=f"pristine CLIP4Clip not found at {PRISTINE} (see ../shared/third_party/README.md)"
)

# Small CLIP: 64 px frames, 16 px patches (a 4x4 grid), 64-wide towers with one head, 32-d embedding.
FRAMES, WORDS, EMBED = 4, 12, 32


def _copy_and_patch(dest: Path) -> Path:
    tree = dest / "CLIP4Clip"
    shutil.copytree(PRISTINE, tree)
    for path in [tree, *tree.rglob("*")]:  # CI's copy of shared/ has no write bits
        path.chmod(path.stat().st_mode | 0o200)
    subprocess.run(["git", "init", "-q", "."], cwd=tree, check=True)
    subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=tree, check=True)
    if shutil.which("patch"):  # the same file works with patch -p1
        subprocess.run(["patch", "-p1", "--dry-run", "-s", "-i", str(PATCH)], cwd=tree, check=True)
    subprocess.run(["git", "apply", str(PATCH)], cwd=tree, check=True)
    return tree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The patched CLIP4Clip, imported: `main_task_retrieval` and `modules.module_clip`."""
    tree = _copy_and_patch(tmp_path_factory.mktemp("clip4clip"))
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(tree))
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        mp.setenv(name, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                         "RANK": "0", "WORLD_SIZE": "1"}[name])
    dist = torch.distributed
    init = dist.init_process_group
    mp.setattr(dist, "init_process_group",
               lambda backend=None, **kw: None if dist.is_initialized() else init(backend="gloo", **kw))
    ddp = torch.nn.parallel.DistributedDataParallel
    mp.setattr(torch.nn.parallel, "DistributedDataParallel",
               lambda module, device_ids=None, output_device=None, **kw: ddp(module, **kw))
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in HOST_MODULES}
    for k in saved:
        del sys.modules[k]
    try:
        module_clip = importlib.import_module("modules.module_clip")
        _write_random_clip(module_clip, tree / "modules" / "ViT-B-32.pt")
        mtr = importlib.import_module("main_task_retrieval")
        mtr.logger = logging.getLogger("clip4clip")
        yield SimpleNamespace(tree=tree, mtr=mtr, mp=mp)
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in HOST_MODULES]:
            del sys.modules[k]
        sys.modules.update(saved)
        if dist.is_initialized():
            dist.destroy_process_group()
        mp.undo()


def _write_random_clip(module_clip, path: Path) -> None:
    """A random CLIP in OpenAI's layout, built with CLIP4Clip's own `CLIP` class and saved as its weights file."""
    torch.manual_seed(0)
    clip = module_clip.CLIP(EMBED, 64, 2, 64, 16, 77, 1000, 64, 1, 2)
    torch.save(clip.state_dict(), path)


def _args(host, sim_header: str, tmp_path: Path, *extra: str):
    """CLIP4Clip's own parser (with the patch's flags) on a launch line like its README's."""
    argv = ["main_task_retrieval.py", "--do_train", "--loose_type", "--sim_header", sim_header,
            "--output_dir", str(tmp_path), "--max_words", str(WORDS), "--max_frames", str(FRAMES),
            "--batch_size", "4", "--lr", "1e-4", "--coef_lr", "1e-3", "--n_display", "1",
            "--pretrained_clip_name", "ViT-B/32", *extra]
    host.mp.setattr(sys, "argv", argv)
    args = host.mtr.get_args()
    args.world_size, args.rank, args.local_rank, args.n_gpu = 1, 0, 0, 1  # what set_seed_logger sets on a GPU
    return args


def _model(host, args):
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CLIP4Clip's own deprecation noise
        return host.mtr.init_model(args, torch.device("cpu"), 1, 0)


def _batch(n: int = 4, seed: int = 0, real=(FRAMES, 2, FRAMES, 1), garbage: float = 5.0):
    """One CLIP4Clip batch in its data loaders' layout; padded frames hold random garbage, not zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 900, (n, 1, WORDS), generator=g)
    ids[:, :, -1] = 999  # the end token: the largest id, where CLIP reads the text feature
    input_mask = torch.ones(n, 1, WORDS, dtype=torch.long)
    segment_ids = torch.zeros(n, 1, WORDS, dtype=torch.long)
    video = torch.randn(n, 1, FRAMES, 1, 3, 64, 64, generator=g)
    video_mask = torch.zeros(n, 1, FRAMES, dtype=torch.long)
    for i, k in enumerate(real[:n]):
        video_mask[i, 0, :k] = 1
        video[i, :, k:] = garbage * torch.randn(video[i, :, k:].shape, generator=g)
    return ids, input_mask, segment_ids, video, video_mask


def _eval_logits(model, batch):
    ids, input_mask, segment_ids, video, video_mask = batch
    model.eval()
    with torch.no_grad():
        seq, vis = model.get_sequence_visual_output(ids, segment_ids, input_mask, video, video_mask)
        logits, _ = model.get_similarity_logits(seq, vis, input_mask, video_mask, loose_type=model.loose_type)
    return logits


def test_patch_applies_to_pristine_clip4clip_with_git_and_patch(host):
    text = (host.tree / "modules" / "modeling.py").read_text()
    assert 'self.sim_header == "MUSE"' in text and "MUSEHead(" in text
    assert "--muse_lr_coef" in (host.tree / "main_task_retrieval.py").read_text()


def test_head_is_built_after_the_hosts_init_and_is_the_identity_at_start(host, tmp_path):
    muse = _model(host, _args(host, "MUSE", tmp_path))
    meanp = _model(host, _args(host, "meanP", tmp_path))
    assert muse.muse.init_overwritten() == []
    assert all(torch.count_nonzero(b.proj.weight) == 0 for b in muse.muse.blocks)
    assert muse.clip.visual.conv1.weight.dtype == torch.float16  # CLIP4Clip keeps CLIP in fp16
    assert next(muse.muse.parameters()).dtype == torch.float32  # the head stays fp32
    batch = _batch()
    torch.testing.assert_close(_eval_logits(muse, batch), _eval_logits(meanp, batch), rtol=1e-5, atol=1e-5)


def test_optimizer_groups_head_at_10x_lr_clip_groups_unchanged(host, tmp_path, monkeypatch):
    args = _args(host, "MUSE", tmp_path)
    model = _model(host, args)
    optimizer, _, ddp = host.mtr.prep_optimizer(args, model, 10, torch.device("cpu"), 1, 0, coef_lr=args.coef_lr)
    assert args.muse_lr_coef == 10.0
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    no_decay = model.muse.no_weight_decay()
    for name, p in model.muse.named_parameters():
        g = group_of[id(p)]
        assert g["lr"] == pytest.approx(10 * args.lr), name
        assert g["weight_decay"] == (0.0 if name in no_decay else 0.2), name
    assert {"blocks.0.mixer.A_log", "blocks.0.mixer.D_b", "blocks.0.norm.weight"} <= no_decay
    # CLIP4Clip's own prep_optimizer, unpatched, assigns every other parameter the same lr and decay
    spec = importlib.util.spec_from_file_location("pristine_main_task_retrieval", PRISTINE / "main_task_retrieval.py")
    pristine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pristine)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda module, **kw: module)
    reference, _, _ = pristine.prep_optimizer(args, model, 10, torch.device("cpu"), 1, 0, coef_lr=args.coef_lr)
    ref_of = {id(p): g for g in reference.param_groups for p in g["params"]}
    others = [(n, p) for n, p in model.named_parameters() if not n.startswith("muse.")]
    assert len(others) > 50
    for name, p in others:
        got, want = group_of[id(p)], ref_of[id(p)]
        assert (got["lr"], got["weight_decay"]) == (want["lr"], want["weight_decay"]), name
    assert len(group_of) == len(list(model.parameters()))


def test_training_with_padded_videos_is_finite_and_reaches_every_head_parameter(host, tmp_path):
    args = _args(host, "MUSE", tmp_path)
    model = _model(host, args)
    optimizer, scheduler, ddp = host.mtr.prep_optimizer(args, model, 3, torch.device("cpu"), 1, 0,
                                                        coef_lr=args.coef_lr)
    before = {n: p.detach().clone() for n, p in model.muse.named_parameters()}
    last_grad = {}
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: last_grad.__setitem__(name, g.detach().clone()))
    batches = [_batch(seed=s) for s in range(3)]  # every batch has padded videos with garbage frames
    with warnings.catch_warnings():
        warnings.simplefilter("error", InitOverwrittenWarning)
        loss, step = host.mtr.train_epoch(0, args, ddp, batches, torch.device("cpu"), 1, optimizer, scheduler, 0)
    assert step == 3 and torch.isfinite(torch.tensor(loss))
    assert all(torch.isfinite(g).all() for g in last_grad.values())
    # the third backward came after two optimizer steps (the first at warm-up lr 0, as BertAdam schedules it)
    head_grads = {n[len("muse."):]: g for n, g in last_grad.items() if n.startswith("muse.")}
    assert set(head_grads) == set(before)
    silent = [n for n, g in head_grads.items() if not g.abs().sum() > 0]
    assert silent == [], f"head parameters without gradient: {silent}"
    for level in range(len(model.muse.pyramid.levels)):
        assert head_grads[f"pyramid.levels.{level}.{len(model.muse.pyramid.levels[level]) - 1}.weight"].norm() > 1e-8
    moved = [n for n, p in model.muse.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("pyramid.") for n in moved) and any(n.endswith("proj.weight") for n in moved)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluation_is_finite_and_ignores_padded_frame_content(host, tmp_path):
    args = _args(host, "MUSE", tmp_path)
    model = _model(host, args)
    with torch.no_grad():  # a trained-looking head, so the blocks do something
        for block in model.muse.blocks:
            block.proj.weight.normal_(std=0.05)
    a = _eval_logits(model, _batch(garbage=5.0))
    b = _eval_logits(model, _batch(garbage=0.0))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # CLIP4Clip's eval_epoch end to end: the head runs once per video, metrics come out
    parts = [_batch(seed=s) for s in range(2)]
    data = torch.utils.data.TensorDataset(*(torch.cat(t) for t in zip(*parts)))
    r1 = host.mtr.eval_epoch(args, model, torch.utils.data.DataLoader(data, batch_size=4), torch.device("cpu"), 1)
    assert 0.0 <= r1 <= 100.0


def test_without_the_patch_order_the_host_init_is_detected(host, tmp_path):
    """Building the head before `self.apply(self.init_weights)` (as a naive patch does) is caught."""
    model = _model(host, _args(host, "MUSE", tmp_path))
    model.muse.apply(model.init_weights)
    assert model.muse.init_overwritten()
    with pytest.warns(InitOverwrittenWarning):
        model.train().get_visual_output(*_batch()[3:])
    model.muse.reset_parameters()
    assert model.muse.init_overwritten() == []
