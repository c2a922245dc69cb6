"""Training curves: per-step loss and learning rates kept in the run's history, drawn to `curves.png`.

Every training step records the global-batch loss and the learning rate of the CLIP and head
parameter groups; at the end of an epoch they go into that epoch's history record under `curve`
(`{"step", "loss", "lr": {"clip", "head"}}`), so they travel in `checkpoint_last.pt` (a resumed run
keeps its curves) and in `results.json`. `curves.png` shows the loss per step (raw and smoothed), the
two learning rates, and validation R@1 per epoch (both directions), and is rewritten after every epoch.

`--tensorboard` also logs the same scalars under `<output_dir>/tensorboard`; it needs the `tensorboard`
package (`pip install 'muse-pyramid[tensorboard]'`), imported only when the flag is given.
Tests: tests/examples/test_curves.py.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["CURVES_NAME", "TrainingCurves", "smooth", "plot_curves", "open_tensorboard"]

logger = logging.getLogger(__name__)

CURVES_NAME = "curves.png"
_GROUPS = ("clip", "head")


def smooth(values: Sequence[float], weight: Optional[float] = None) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard's smoothing); non-finite values are skipped.

    `weight` None picks one from the length: about 1 % of the steps as the averaging window, at most 0.99.
    """
    x = np.asarray(values, dtype=np.float64)
    if weight is None:
        weight = min(0.99, max(0.0, 1.0 - 1.0 / max(1.0, len(x) / 100.0)))
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight must be in [0, 1), got {weight}")
    out = np.full_like(x, np.nan)
    avg, norm = 0.0, 0.0
    for i, v in enumerate(x):
        if math.isfinite(v):
            avg = weight * avg + (1.0 - weight) * v
            norm = weight * norm + (1.0 - weight)
        if norm > 0:
            out[i] = avg / norm
    return out


def open_tensorboard(log_dir: Path):
    """A `torch.utils.tensorboard.SummaryWriter` at `log_dir`; ImportError with the install line otherwise."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("--tensorboard needs the tensorboard package: pip install 'muse-pyramid[tensorboard]' "
                          "(or pip install tensorboard)") from err
    return SummaryWriter(log_dir=str(log_dir))


def _group_lrs(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """Learning rate of the first CLIP group and the first head group (groups are named `clip_*` / `head_*`)."""
    out: Dict[str, float] = {}
    for g in optimizer.param_groups:
        tag = str(g.get("name", "")).split("_", 1)[0]
        if tag in _GROUPS and tag not in out:
            out[tag] = float(g["lr"])
    return out


class TrainingCurves:
    """Collects the per-step curves of a run; writes `curves.png` (and TensorBoard scalars) on the main process.

    Args:
        optimizer: the run's optimizer (its groups are named `clip_*` / `head_*` by `optim.build_param_groups`).
        out_dir: the run's output folder.
        is_main: only the main process writes files.
        tensorboard: also log to `<out_dir>/tensorboard` (needs the `tensorboard` package).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, out_dir: str | Path, *, is_main: bool = True,
                 tensorboard: bool = False) -> None:
        self.optimizer, self.out_dir, self.is_main = optimizer, Path(out_dir), is_main
        self.writer = open_tensorboard(self.out_dir / "tensorboard") if (tensorboard and is_main) else None
        self._reset()

    def _reset(self) -> None:
        self._steps: List[int] = []
        self._loss: List[float] = []
        self._lr: Dict[str, List[float]] = {}

    def step(self, step: int, loss: torch.Tensor | float) -> None:
        """Record global step `step` (1-based): its loss and the learning rates the optimizer is about to use."""
        value = float(loss)
        self._steps.append(int(step))
        self._loss.append(value)
        lrs = _group_lrs(self.optimizer)
        for tag, lr in lrs.items():
            self._lr.setdefault(tag, []).append(lr)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", value, step)
            for tag, lr in lrs.items():
                self.writer.add_scalar(f"lr/{tag}", lr, step)

    def end_epoch(self, record: Mapping[str, Any]) -> Dict[str, Any]:
        """This epoch's curve (to store as `record["curve"]`); logs the epoch's validation metrics."""
        curve = {"step": self._steps, "loss": self._loss, "lr": self._lr}
        if self.writer is not None:
            for direction, metrics in (record.get("val") or {}).items():
                for key in ("R@1", "R@5", "R@10", "MdR"):
                    if key in metrics:
                        self.writer.add_scalar(f"val/{direction}_{key}", metrics[key], record.get("step", 0))
            self.writer.flush()
        self._reset()
        return curve

    def write(self, history: Sequence[Mapping[str, Any]], test: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
        """Redraw `curves.png` from the history (main process); returns its path."""
        if not self.is_main:
            return None
        return plot_curves(history, self.out_dir / CURVES_NAME, test=test)

    def finish(self, results: Dict[str, Any]) -> None:
        """End of training: final `curves.png` (with the test R@1), and `results.json` when the run did not
        test (a tested run's is written by `evaluate.write_results`); closes TensorBoard."""
        test = results.get("test")
        if self.is_main:
            self.write(results.get("history", []), test=test)
            if test is None:
                with open(self.out_dir / "results.json", "w", encoding="utf-8") as f:
                    json.dump(results, f, indent=2, default=str)
        if self.writer is not None:
            if test is not None:
                for direction, metrics in test.get("metrics", {}).items():
                    self.writer.add_scalar(f"test/{direction}_R@1", metrics["R@1"], 0)
            self.writer.close()
            self.writer = None


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | Path,
                test: Optional[Mapping[str, Any]] = None) -> Path:
    """Draw loss per step (raw, smoothed), the CLIP / head learning rates and validation R@1 per epoch.

    Args:
        history: the run's epoch records (`train.train`'s `history`, with `curve` per epoch).
        path: the PNG to write.
        test: the final test result (`{"metrics": ...}`), marked on the R@1 panel when given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [s for r in history for s in (r.get("curve") or {}).get("step", [])]
    loss = [v for r in history for v in (r.get("curve") or {}).get("loss", [])]
    fig, (ax_loss, ax_lr, ax_val) = plt.subplots(1, 3, figsize=(15, 3.8))
    if steps:
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="per step")
        ax_loss.plot(steps, smooth(loss), color="tab:blue", lw=1.8, label="smoothed")
        ax_loss.legend(loc="upper right")
    else:
        ax_loss.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set(title="training loss (global batch InfoNCE)", xlabel="step", ylabel="loss")
    for tag, colour in zip(_GROUPS, ("tab:orange", "tab:green")):
        lr_steps = [s for r in history for s in (r.get("curve") or {}).get("step", [])
                    if tag in (r.get("curve") or {}).get("lr", {})]
        lr = [v for r in history for v in (r.get("curve") or {}).get("lr", {}).get(tag, [])]
        if lr and len(lr) == len(lr_steps):
            ax_lr.plot(lr_steps, lr, color=colour, label=f"{tag} group")
    if ax_lr.lines:
        ax_lr.set_yscale("log")
        ax_lr.legend(loc="lower center")
    ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
    epochs = [int(r["epoch"]) + 1 for r in history if r.get("val")]
    for direction, marker in (("t2v", "o-"), ("v2t", "s--")):
        values = [r["val"][direction]["R@1"] for r in history if r.get("val")]
        if values:
            ax_val.plot(epochs, values, marker, label=f"val {direction}")
    if test is not None:
        last = int(history[-1]["epoch"]) + 1 if history else 1
        for direction, marker in (("t2v", "*"), ("v2t", "P")):
            ax_val.plot([last], [test["metrics"][direction]["R@1"]], marker, ms=12, label=f"test {direction}")
    if ax_val.lines:
        ax_val.legend(loc="lower right")
    else:
        ax_val.text(0.5, 0.5, "no validation split (--no_val)", ha="center", va="center", transform=ax_val.transAxes)
    ax_val.set(title="R@1 per epoch", xlabel="epoch", ylabel="R@1 (%)", ylim=(0, 100))
    last_epoch = int(history[-1]["epoch"]) + 1 if history else 1
    ax_val.set_xlim(0.5, last_epoch + 0.5)  # whole epochs, also when only one point is drawn
    ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
