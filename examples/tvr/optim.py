"""AdamW parameter groups and the warm-up + cosine schedule of the CLIP4Clip / MUSE recipe.

- CLIP's parameters (including its logit scale) learn at `lr * coef_lr` (1e-7 in the recipe);
  the video head learns at `lr * head_lr_mult` (1e-3 for MUSE: x10).
- No weight decay on biases, norm weights, any other 1-D parameter, the logit scale, and the
  head's own `no_weight_decay()` names (Mamba's `A_log`, `D`, ...).
- Learning rate: linear warm-up over the first `warmup_proportion` of the steps, then a cosine
  decay to zero over the remaining steps.
Tests: tests/examples/test_optim.py.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import nn

__all__ = ["build_param_groups", "build_optimizer", "WarmupCosine", "build_scheduler"]

ADAM_BETAS = (0.9, 0.98)
ADAM_EPS = 1e-6
WEIGHT_DECAY = 0.2


def _no_decay(name: str, param: torch.Tensor, extra: set) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or name.endswith("bias") or "logit_scale" in name or name in extra or leaf in extra


def _split(module: nn.Module, lr: float, weight_decay: float, extra: set, tag: str) -> List[Dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _no_decay(name, param, extra) else decay).append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{tag}_decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{tag}_no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    coef_lr: float,
    head_lr_mult: float,
    weight_decay: float = WEIGHT_DECAY,
) -> List[Dict[str, Any]]:
    """Optimizer groups for a `CLIP4Clip` model (`model.clip` + optional `model.head`).

    Every trainable parameter lands in exactly one group; a group dict carries `name` (for logs),
    `lr` and `weight_decay`. The head's `param_groups(lr, weight_decay)` hook is used when it has one
    (MUSEHead), otherwise the generic rule above.
    """
    for arg, value in (("lr", lr), ("coef_lr", coef_lr), ("head_lr_mult", head_lr_mult)):
        if not value > 0:
            raise ValueError(f"{arg} must be > 0, got {value}")
    groups = _split(model.clip, lr * coef_lr, weight_decay, set(), "clip")
    head = getattr(model, "head", None)
    if head is not None:
        head_lr = lr * head_lr_mult
        if hasattr(head, "param_groups"):
            head_groups = [dict(g) for g in head.param_groups(head_lr, weight_decay)]
            for i, g in enumerate(head_groups):
                g.setdefault("name", f"head_{i}")
                g["params"] = [p for p in g["params"] if p.requires_grad]
            head_groups = [g for g in head_groups if g["params"]]
        else:
            extra = set(head.no_weight_decay()) if hasattr(head, "no_weight_decay") else set()
            head_groups = _split(head, head_lr, weight_decay, extra, "head")
        groups += head_groups
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    if sorted(seen) != sorted(trainable):
        raise RuntimeError(
            f"parameter groups cover {len(seen)} tensors ({len(set(seen))} unique) but the model has "
            f"{len(trainable)} trainable tensors"
        )
    return groups


def build_optimizer(model: nn.Module, *, lr: float, coef_lr: float, head_lr_mult: float,
                    weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.98), eps 1e-6 over `build_param_groups`.

    The fused implementation (one kernel over all tensors) when every parameter is a contiguous
    floating CPU or CUDA tensor: the same update, several times faster than the per-tensor loop (ViT-B/32 + MUSE head
    on a 2-core CPU: 0.06 s a step against 0.3 s).
    """
    groups = build_param_groups(model, lr=lr, coef_lr=coef_lr, head_lr_mult=head_lr_mult,
                                weight_decay=weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        p.is_floating_point() and p.is_contiguous() and p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay,
                             fused=fused or None)


class WarmupCosine:
    """Multiplier of the base lr at step s (0-based): `(s + 1) / (w + 1)` for s < w, then
    `0.5 (1 + cos(pi (s - w) / (S - w)))`, with w = round(warmup_proportion * S) and S = total steps.

    A picklable callable (not a lambda), so `LambdaLR.state_dict()` stays plain data.
    """

    def __init__(self, total_steps: int, warmup_proportion: float = 0.1) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= warmup_proportion < 1.0:
            raise ValueError(f"warmup_proportion must be in [0, 1), got {warmup_proportion}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(round(warmup_proportion * total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_proportion: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` applying `WarmupCosine` to every group's own base lr; call `.step()` once per step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_proportion))
