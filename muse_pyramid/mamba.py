"""Bidirectional Mamba in the Vision Mamba (Vim) "v2" layout, as MUSE uses it (Sec. 3.3).

Shape letters: B = batch, L = sequence length, C = d_model, D = d_inner = expand * C,
N = d_state, R = dt_rank.

Parameter names follow Vim's `bimamba_type="v2"` so the public release's checkpoints load by name:
shared `in_proj` (C -> 2D, no bias) and `out_proj` (D -> C, no bias); per direction `A_log (D, N)`,
`D (D,)`, `conv1d` (depthwise, width d_conv), `x_proj (D -> R + 2N)`, `dt_proj (R -> D)`; the backward
set carries a `_b` suffix (`A_b_log`, `D_b`, `conv1d_b`, `x_proj_b`, `dt_proj_b`). Each direction computes, on its own copy of `x, z = split(in_proj(u))`:

    x     = SiLU(causal_conv1d(x))
    dt, B, C = split(x_proj(x))
    delta = softplus(dt_proj(dt))
    y     = selective_scan(x, delta, A = -exp(A_log), B, C, D) * SiLU(z)

The backward direction runs the same recipe on time-reversed `x, z` and its output is mapped back;
the output is `out_proj(y_fwd + y_bwd)`. With `positions`, only some rows are wanted: the scans run
ungated over the whole sequence, and the gate SiLU(z) (shared by both directions) and `out_proj` are
applied at those rows alone.

Padding: with a `(B, L)` mask whose real tokens come first (see `aggregate.py`), the backward
direction reverses each sequence's real prefix and leaves the padding at its tail (one gather with
per-sequence indices, `reversal_index`; the same gather maps the outputs back). Both directions are
then plain causal scans in which the padding comes after every real token, so no real token can see
a padded one: no delta masking, no reverse flags. The input tokens at padded positions are zeroed
first, so whatever they held (NaN included) never reaches a real output.

On CUDA with mamba-ssm and causal-conv1d built, each direction runs through mamba-ssm's fused
`mamba_inner_fn` (its backward recomputes the conv and delta); elsewhere through `muse_pyramid.ops`,
with the projections as batched GEMMs that read and write the channel-major `(B, D, L)` layout of the
conv and the scan directly (`project`; bare `nn.Linear` projections, anything else is called).
Tests: `tests/test_mamba.py`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ._validate import check_positions, check_prefix_mask, check_tensor
from .config import MUSEConfig
from .ops import causal_conv1d, conv_backend, scan_backend, selective_scan
from .ops._dispatch import INNER_KERNEL, probe_cuda_kernel

__all__ = ["BiMamba", "plain_linear", "project", "reversal_index"]


def reversal_index(mask: Optional[torch.Tensor], batch: int, length: int, device: torch.device) -> torch.Tensor:
    """`(B, L)` index that reverses each sequence's real prefix and leaves its padded tail in place.

    Row b maps position t to `n_b - 1 - t` for t < n_b (n_b real tokens) and to t after them; with no
    mask, to `L - 1 - t`. The map is its own inverse, so one gather with it reverses and a second one
    restores the order.

    mask: `(B, L)` bool (real tokens first) or None.
    """
    steps = torch.arange(length, device=device)
    if mask is None:
        return (length - 1 - steps).expand(batch, length)
    real = mask.sum(dim=1, keepdim=True)  # (B, 1)
    return torch.where(steps < real, real - 1 - steps, steps)


class _Reverse(torch.autograd.Function):
    """`x.gather(dim, index)` for an `index` that is its own inverse (`reversal_index`, expanded).

    The gradient of such a gather is the same gather. Autograd's generic gather backward instead fills
    a zero tensor and scatter-adds into it (with atomics on CUDA, so not deterministic there); for a
    permutation that is two extra passes over the tensor for nothing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(index)
        ctx.dim = dim
        return x.gather(dim, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (index,) = ctx.saved_tensors
        return grad.gather(ctx.dim, index), None, None


def reverse(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Reverse each sequence's real prefix of `x` along `dim` with `index` (`reversal_index` expanded to
    x's shape); applying it twice restores x. The gradient is the same gather (see `_Reverse`)."""
    return _Reverse.apply(x, index, dim)


# the hook registries that calling a module runs (each also exists with a `_global` prefix, for all modules)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def plain_linear(module: nn.Module) -> bool:
    """Whether `module` is a bare `nn.Linear` whose call may be replaced by a GEMM on its weight: not a
    subclass or a wrapper, and no hooks, its own or global, that calling it would run."""
    own = [getattr(module, name, None) for name in _HOOKS]
    everyone = [getattr(nn.modules.module, f"_global{name}", None) for name in _HOOKS]
    return type(module) is nn.Linear and not any(own + everyone)


def project(linear: nn.Module, x: torch.Tensor, time_major: bool = False, bias: bool = True) -> torch.Tensor:
    """`linear` applied to the channels of a channel-major `x` `(B, I, L)`.

    Returns `(B, O, L)`, or `(B, L, O)` with `time_major`, contiguous either way. A bare `nn.Linear`
    (`plain_linear`) runs as one batched GEMM that reads `x` in place (a transposed view or a channel
    slice included) and writes the requested layout directly, so no transposed copy is made, forward
    or backward; with `bias=False` its bias is left for the caller to add. Any other module (a LoRA
    wrapper or a hooked Linear, say) is called on the time-major view and its output rearranged
    (`bias` must then be True).
    """
    if plain_linear(linear):
        b = linear.bias if bias else None
        if time_major:  # (B, L, I) @ (I, O)
            y = torch.bmm(x.transpose(1, 2), linear.weight.t().expand(x.shape[0], -1, -1))
            return y if b is None else y + b
        y = torch.bmm(linear.weight.expand(x.shape[0], -1, -1), x)  # (O, I) @ (I, L)
        return y if b is None else y + b[:, None]
    if not bias:
        raise ValueError(
            f"project: bias=False needs a plain nn.Linear without hooks, got {type(linear).__name__}"
        )
    y = linear(rearrange(x, "b i l -> b l i"))
    return y if time_major else rearrange(y, "b l o -> b o l").contiguous()


def _a_log(suffix: str) -> str:
    """Vim's name for A of a direction: `A_log` forward, `A_b_log` backward (the only irregular name)."""
    return "A_log" if not suffix else f"A{suffix}_log"


class BiMamba(nn.Module):
    """Mamba with optional bidirectional scanning (Vim "v2" layout and names).

    Args:
        d_model: token width C.
        d_state: SSM state size N.
        d_conv: width of the causal depthwise convolution.
        expand: d_inner = expand * d_model.
        dt_rank: rank R of the delta projection; "auto" = ceil(d_model / 16).
        dt_min, dt_max: range of the initial delta (log-uniform), Mamba's defaults.
        dt_init_floor: lower clamp of the initial delta.
        bidirectional: False gives plain (forward-only) Mamba; no backward parameters are created.
        scan_backend, conv_backend: force a kernel backend (see `muse_pyramid.ops`); None = automatic.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = MUSEConfig.d_state,
        d_conv: int = MUSEConfig.d_conv,
        expand: int = MUSEConfig.expand,
        dt_rank: Union[int, str] = MUSEConfig.dt_rank,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bidirectional: bool = True,
        scan_backend: Optional[str] = None,
        conv_backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank <= 0):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.bidirectional = bidirectional
        self.scan_backend = scan_backend
        self.conv_backend = conv_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        suffixes = ("", "_b") if bidirectional else ("",)
        for s in suffixes:
            self.register_parameter(_a_log(s), nn.Parameter(torch.empty(self.d_inner, d_state)))
            self.register_parameter(f"D{s}", nn.Parameter(torch.empty(self.d_inner)))
            self.add_module(
                f"conv1d{s}",
                nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=True),
            )
            self.add_module(f"x_proj{s}", nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            self.add_module(f"dt_proj{s}", nn.Linear(self.dt_rank, self.d_inner, bias=True))
        self.reset_parameters()

    @property
    def _suffixes(self) -> tuple:
        return ("", "_b") if self.bidirectional else ("",)

    def reset_parameters(self) -> None:
        """Mamba's initialisation (mamba_simple.py), for both directions.

        dt_proj: weight U(-R^-1/2, R^-1/2); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        (so softplus(bias) starts in that range). A_log = log(1..N) per channel (S4D-real), D = 1; both
        are tagged `_no_weight_decay`. Projections and convs keep PyTorch's default init.
        """
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        for s in self._suffixes:
            getattr(self, f"conv1d{s}").reset_parameters()
            getattr(self, f"x_proj{s}").reset_parameters()
            dt_proj: nn.Linear = getattr(self, f"dt_proj{s}")
            std = self.dt_rank**-0.5
            with torch.no_grad():
                nn.init.uniform_(dt_proj.weight, -std, std)
                dt = torch.exp(
                    torch.rand(self.d_inner) * (math.log(self.dt_max) - math.log(self.dt_min))
                    + math.log(self.dt_min)
                ).clamp(min=self.dt_init_floor)
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
                a = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
                getattr(self, _a_log(s)).copy_(torch.log(a))
                getattr(self, f"D{s}").fill_(1.0)
            getattr(self, _a_log(s))._no_weight_decay = True
            getattr(self, f"D{s}")._no_weight_decay = True

    def no_weight_decay(self) -> set:
        """Names of the parameters that carry no weight decay (A_log, D and their backward twins)."""
        return {name for s in self._suffixes for name in (_a_log(s), f"D{s}")}

    def _direction(self, x: torch.Tensor, z: Optional[torch.Tensor], s: str) -> torch.Tensor:
        """One scan direction (`s` = "" forwards, "_b" for the backward one, fed time-reversed input).

        x: `(B, D, L)` with unit time stride (a channel slice is read in place); z: `(B, D, L)` gate, or None
        for the ungated scan -> y `(B, D, L)`.
        Both directions are plain causal scans: the caller reverses each sequence for "_b".
        """
        conv: nn.Conv1d = getattr(self, f"conv1d{s}")
        x = causal_conv1d(
            x, rearrange(conv.weight, "d 1 w -> d w"), conv.bias, activation="silu", backend=self.conv_backend
        )
        x_dbl = project(getattr(self, f"x_proj{s}"), x)  # (B, R + 2N, L)
        dt, b_ssm, c_ssm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt_proj: nn.Module = getattr(self, f"dt_proj{s}")
        if plain_linear(dt_proj):  # its bias becomes the scan's delta_bias, added inside the scan
            delta, delta_bias = project(dt_proj, dt, bias=False), dt_proj.bias
        else:
            delta, delta_bias = project(dt_proj, dt), None
        return selective_scan(
            x, delta, -torch.exp(getattr(self, _a_log(s)).float()), b_ssm.contiguous(), c_ssm.contiguous(),
            getattr(self, f"D{s}").float(), z=z, delta_bias=delta_bias, delta_softplus=True, backend=self.scan_backend,
        )

    def _fused_inner(self, x: torch.Tensor) -> Optional[Callable]:
        """mamba-ssm's `mamba_inner_fn` when this call can take it, else None.

        It needs CUDA tensors, both CUDA kernels (not forced away by `scan_backend`/`conv_backend` or
        their environment variables), a conv width the kernel supports, and plain bias-free `nn.Linear`
        projections (it reads their weights, so a wrapped projection, e.g. LoRA, takes the separate ops;
        `dt_proj`'s bias becomes the scan's delta bias).
        """
        if x.device.type != "cuda":
            return None
        no_bias = [self.in_proj, self.out_proj, *self._modules_named("x_proj")]  # it takes no bias for these
        if not all(plain_linear(m) for m in no_bias + self._modules_named("dt_proj")) or any(
            m.bias is not None for m in no_bias
        ):
            return None
        try:
            if scan_backend(x, self.scan_backend) != "cuda" or conv_backend(x, self.conv_backend, self.d_conv) != "cuda":
                return None
        except RuntimeError:  # a forced backend that cannot run: the separate ops raise the error
            return None
        fn, _ = probe_cuda_kernel(*INNER_KERNEL)
        return fn

    def _modules_named(self, prefix: str) -> list:
        """The submodule `prefix` of each direction, e.g. [dt_proj, dt_proj_b]."""
        return [getattr(self, f"{prefix}{s}") for s in self._suffixes]

    def _inner_args(self, s: str) -> tuple:
        """Positional arguments of `mamba_inner_fn` after `xz`, for direction `s`."""
        conv: nn.Conv1d = getattr(self, f"conv1d{s}")
        dt_proj: nn.Linear = getattr(self, f"dt_proj{s}")
        return (
            conv.weight, conv.bias, getattr(self, f"x_proj{s}").weight, dt_proj.weight, self.out_proj.weight, None,
            -torch.exp(getattr(self, _a_log(s)).float()), None, None, getattr(self, f"D{s}").float(),
            None if dt_proj.bias is None else dt_proj.bias.float(),
        )

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Mix a sequence.

        Args:
            x: `(B, L, C)` tokens.
            mask: `(B, L)` bool, True on real tokens, which must come before the padding; None = all real.
            positions: `(B, P)` integer row indices, or None for all rows. Given, the output is only those
                rows, `forward(x, mask)[b, positions[b]]`: both scans still run over the whole sequence,
                but the gate `z` and `out_proj` are computed at the P rows alone.

        Returns:
            `(B, L, C)`, or `(B, P, C)` with `positions`; rows at padded positions are defined (finite) but
            meaningless.
        """
        check_tensor("x", x, 3, "(B, L, C)")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, L, C) with C = {self.d_model}, got {tuple(x.shape)}")
        if mask is not None:
            mask = check_prefix_mask(mask, x.shape[:2])
            # padded tokens become zeros (whatever they held, NaN included), so the conv and scan inputs
            # there are finite; they sit behind every real token in both directions
            x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        if positions is not None:
            positions = check_positions(positions, x.shape[0], x.shape[1])
        back = reversal_index(mask, x.shape[0], x.shape[1], x.device) if self.bidirectional else None
        inner = self._fused_inner(x)
        if inner is not None:
            return self._forward_fused(inner, x, back, positions)
        # channel-major halves of one (B, 2D, L) tensor, as the conv and the scan read them (in place)
        xs, zs = project(self.in_proj, rearrange(x, "b l c -> b c l")).split(self.d_inner, dim=1)
        if positions is not None:
            zs = zs.gather(2, repeat(positions, "b p -> b d p", d=self.d_inner))
        back_d = None if back is None else repeat(back, "b l -> b d l", d=self.d_inner)
        if positions is None:  # the gate is fused into each scan: (y_f + y_b) * silu(z) = sum of gated scans
            y = self._direction(xs, zs, "")
            if self.bidirectional:
                y = y + reverse(self._direction(reverse(xs, back_d, 2), reverse(zs, back_d, 2), "_b"), back_d, 2)
        else:  # ungated scans, read at the rows (the backward scan at the rows' reversed places), gated there
            y = self._direction(xs, None, "").gather(2, repeat(positions, "b p -> b d p", d=self.d_inner))
            if self.bidirectional:
                rows_b = repeat(back.gather(1, positions), "b p -> b d p", d=self.d_inner)
                y = y + self._direction(reverse(xs, back_d, 2), None, "_b").gather(2, rows_b)
            y = y * F.silu(zs.to(y.dtype))
        return project(self.out_proj, y, time_major=True)

    def _forward_fused(
        self, inner: Callable, x: torch.Tensor, back: Optional[torch.Tensor], positions: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Each direction through mamba-ssm's `mamba_inner_fn` (conv, projections, scan, gate and out_proj
        fused, conv and delta recomputed in its backward). out_proj has no bias, so the sum of the two
        directions' outputs is out_proj(y_f + y_b), the Vim "v2" output.

        x: `(B, L, C)` (padding zeroed); back: `(B, L)` reversal index or None; positions: `(B, P)` or None.
        """
        xz = project(self.in_proj, rearrange(x, "b l c -> b c l"))  # (B, 2D, L), time contiguous
        out = inner(xz, *self._inner_args(""), delta_softplus=True)  # (B, L, C)
        if self.bidirectional:
            rev = repeat(back, "b l -> b l c", c=x.shape[-1])
            xz_b = reverse(xz, repeat(back, "b l -> b d l", d=xz.shape[1]), 2)
            out = out + reverse(inner(xz_b, *self._inner_args("_b"), delta_softplus=True), rev, 1)
        if positions is not None:
            out = out.gather(1, repeat(positions, "b p -> b p c", c=out.shape[-1]))
        return out

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
            f"dt_rank={self.dt_rank}, bidirectional={self.bidirectional}"
        )
