"""Builders shared by training, evaluation and the demo: data sets, tokenizer, frames and models.

A saved model is self-describing: our checkpoints hold `model_config` (head config + CLIP source), and
CLIP's architecture is read back from its own weights, so `--do_eval --init_model ckpt` needs no
weights folder. `--init_model` also accepts CLIP4Clip state dicts (meanP / seqTransf names) and the
public MUSE release's (`MS_mamba.*`, converted by `muse_pyramid.convert`).
Tests: tests/examples/test_cli.py, tests/examples/test_evaluate.py.
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .model import CLIP4Clip, build_clip, build_model, build_small_clip, clip_context_length, clip_image_size

__all__ = ["dataset_module", "data_options", "load_samples", "make_tokenizer", "frame_config", "muse_options",
           "build_model_from_args", "build_model_from_state", "load_model_state", "model_config"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ data
def dataset_module(name: str):
    """The module of data set `name` (`load_split`, `DEFAULTS`)."""
    from .data import DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def data_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword options for the data set's `load_split` taken from the CLI flags it understands."""
    module = dataset_module(args.dataset)
    known = set(getattr(module, "DEFAULTS", {})) | set(getattr(module, "OPTIONS", ()))
    candidates = {  # MSR-VTT's flags exist on its command line only
        "train_csv": getattr(args, "train_csv", None),
        "val_csv": getattr(args, "val_csv", None),
        "test_csv": getattr(args, "test_csv", None),
        "expand_sentences": getattr(args, "expand_msrvtt_sentences", None) if args.dataset == "msrvtt" else None,
    }
    if args.dataset == "msrvtt":
        known.add("val_csv")
    return {k: v for k, v in candidates.items() if v is not None and k in known}


def load_samples(args: argparse.Namespace, split: str) -> list:
    return dataset_module(args.dataset).load_split(args.data_path, args.features_path, split, **data_options(args))


def make_tokenizer(max_words: int) -> Callable[[List[str]], torch.Tensor]:
    """texts -> `(N, max_words)` CLIP BPE ids (offline), `[start] + words[: max_words - 2] + [end]`."""
    from muse_pyramid.backbones import clip_tokenize

    def tokenize(texts: List[str]) -> torch.Tensor:
        return clip_tokenize(texts, max_words)

    return tokenize


def frame_config(args: argparse.Namespace, clip: nn.Module):
    """`FrameConfig` from the flags, at CLIP's input resolution."""
    from .video import FrameConfig

    return FrameConfig(max_frames=args.max_frames, feature_framerate=args.feature_framerate,
                       slice_framepos=args.slice_framepos, image_resolution=clip_image_size(clip))


# ----------------------------------------------------------------------------------- models
def muse_options(args: argparse.Namespace) -> Dict[str, Any]:
    """`MUSEConfig` fields from the `--muse_*` flags (dim comes from CLIP)."""
    return {"scales": tuple(args.muse_scales), "depth": args.muse_depth, "aggregation": args.muse_aggregation,
            "mixer": args.muse_mixer, "d_state": args.muse_d_state, "dropout": args.muse_dropout}


def _clip_from_args(args: argparse.Namespace) -> nn.Module:
    if getattr(args, "small_clip", None) is not None:
        return build_small_clip(**args.small_clip)
    return build_clip(args.pretrained_clip_name, weights_dir=args.clip_weights_dir, random_init=args.random_init_clip)


def build_model_from_args(args: argparse.Namespace) -> CLIP4Clip:
    """CLIP (weights folder / path / random when asked) + the `--sim_header` head."""
    clip = _clip_from_args(args)
    if args.max_words > clip_context_length(clip):
        raise ValueError(f"--max_words {args.max_words} exceeds CLIP's context length {clip_context_length(clip)}")
    model = build_model(clip, sim_header=args.sim_header, muse=muse_options(args),
                        seq_transf={"layers": args.cross_num_hidden_layers}, max_frames=args.max_frames,
                        frame_chunk_size=args.frame_chunk_size)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def model_config(model: CLIP4Clip, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    """What `build_model_from_state` needs besides the weights."""
    cfg = model.head_config()
    if args is not None:
        cfg["clip_source"] = "small" if getattr(args, "small_clip", None) is not None else args.pretrained_clip_name
        cfg["max_frames"] = args.max_frames
        if getattr(args, "frozen_clip_weights", None):  # CLIP left as these weights: evaluable from their cache
            cfg["frozen_clip_weights"] = args.frozen_clip_weights
    return cfg


_SEQ_RENAMES = ((re.compile(r"^transformerClip\."), "head.transformer."),
                (re.compile(r"^frame_position_embeddings\."), "head.frame_position_embeddings."))


def load_model_state(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """Read `--init_model`: returns `(CLIP4Clip state dict, model_config or None)`.

    Accepts our `checkpoint_last.pt` / `model_best.pt`, a bare state dict of this model, CLIP4Clip's
    `pytorch_model.bin.N` (`clip.*`, `transformerClip.*`, `frame_position_embeddings.*`) and the MUSE
    release's (`clip.*` + `MS_mamba.*`), with or without a `module.` prefix.
    """
    obj = load_checkpoint(path)
    config = obj.get("model_config") if isinstance(obj.get("model_config"), Mapping) else None
    state = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("MS_mamba.") for k in state):
        from muse_pyramid import convert_release_state_dict

        head_sd, rest = convert_release_state_dict(state)
        state = {**{k: state[k] for k in rest}, **{f"head.{k}": v for k, v in head_sd.items()}}
        logger.warning("%s is a MUSE release checkpoint: it holds no pyramid weights (left as initialised)", path)
    out = {}
    for key, value in state.items():
        for pattern, repl in _SEQ_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    if not any(k.startswith("clip.") for k in out):
        raise ValueError(f"--init_model {path}: no 'clip.*' weights found (keys like {list(out)[:5]})")
    return out, dict(config) if config is not None else None


def build_model_from_state(state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                           frame_chunk_size: Optional[int] = None) -> CLIP4Clip:
    """Rebuild a `CLIP4Clip` from its weights: CLIP's architecture from `clip.*`, the head from `config`."""
    from muse_pyramid.backbones import build_open_clip_from_openai

    clip_sd = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    clip = build_open_clip_from_openai(clip_sd)
    sim_header = config["sim_header"]
    model = build_model(clip, sim_header=sim_header, muse=config.get("muse"), seq_transf=config.get("seq_transf"),
                        max_frames=int(config.get("max_frames", 12)), init_seq_from_clip=False,
                        frame_chunk_size=frame_chunk_size)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    pyramid_missing = [k for k in missing if k.startswith("head.pyramid.")]
    other_missing = [k for k in missing if k not in pyramid_missing]
    if other_missing or unexpected:
        raise ValueError(f"weights do not match a {sim_header} model: missing {other_missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if pyramid_missing:
        logger.warning("no pyramid weights in the checkpoint: %d pyramid tensors left as initialised",
                       len(pyramid_missing))
    return model
