"""Helpers for the backbone tests: a small CLIP in OpenAI's module layout, a fake OpenAI archive, checks.

`OpenAICLIP` follows OpenAI's ``clip/model.py`` (key names, sequence-first transformer, fp32
LayerNorm, QuickGELU, argmax text pooling) with any width, so a TorchScript archive traced from it
has the key names and the extra entries (``input_resolution``, ``context_length``, ``vocab_size``)
of OpenAI's ``ViT-B-32.pt``, with random weights.
"""

import warnings
from collections import OrderedDict

import torch
from torch import nn

# Width, depth and sizes of the fake OpenAI release (a small ViT/16 at 64 px: a 4x4 grid).
ARCHIVE_CFG = dict(
    embed_dim=96, image_resolution=64, vision_width=128, vision_layers=2, vision_patch_size=16,
    context_length=16, vocab_size=1000, transformer_width=128, transformer_layers=2,
)


class LayerNorm(nn.LayerNorm):
    """OpenAI's LayerNorm: computes in fp32, returns the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)
        self.attn_mask = attn_mask  # a plain attribute, as in OpenAI's code: not in the state dict

    def forward(self, x):  # (L, N, width)
        mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):  # OpenAI's: returns the projected CLS token only
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAICLIP(nn.Module):
    """OpenAI's ``CLIP`` (ViT image tower), any size; random weights drawn from `generator`."""

    def __init__(self, embed_dim, image_resolution, vision_width, vision_layers, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_layers, generator=None):
        super().__init__()
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_width // 64, embed_dim)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_width // 64, mask)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        # What OpenAI's archives hold besides the weights (OpenAI's build_model drops them).
        self.register_buffer("input_resolution", torch.tensor(image_resolution))
        self.register_buffer("context_length", torch.tensor(context_length))
        self.register_buffer("vocab_size", torch.tensor(vocab_size))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim > 1 or "embedding" in name or "proj" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02 * (1 if p.ndim > 1 else 5))
                elif name.endswith("weight"):  # LayerNorm gains: not all ones, so a swapped norm shows
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=generator))

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        return self.visual(image.type(self.dtype))

    def encode_text(self, text):
        x = self.token_embedding(text).type(self.dtype) + self.positional_embedding.type(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
        return self.encode_image(image), self.encode_text(text)


def convert_to_fp16(model: nn.Module) -> nn.Module:
    """OpenAI's ``convert_weights``: conv, linear, attention and projection weights to fp16, norms stay fp32."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.half()
        if isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.half()
            module.in_proj_bias.data = module.in_proj_bias.data.half()
        for name in ("proj", "text_projection"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                param.data = param.data.half()
    return model


def make_openai_clip(seed: int = 0, **overrides) -> OpenAICLIP:
    cfg = dict(ARCHIVE_CFG, **overrides)
    return OpenAICLIP(**cfg, generator=torch.Generator().manual_seed(seed)).eval()


def trace_openai_archive(model: OpenAICLIP, path) -> None:
    """Save `model` the way OpenAI's releases are stored: a traced TorchScript module."""
    size = int(model.input_resolution)
    images = torch.zeros(2, 3, size, size)
    text = torch.zeros(2, model.positional_embedding.shape[0], dtype=torch.long)
    text[:, 0], text[:, 3] = 5, 7
    with warnings.catch_warnings():  # recent torch marks TorchScript as deprecated; MHA's checks warn in tracing
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace_module(
            model, {"forward": (images, text), "encode_image": (images,), "encode_text": (text,)}, check_trace=False
        )
        traced.save(str(path))


# ---------------------------------------------------------------- shared checks


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """`(n, 3, size, size)` random images from a seeded generator."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(fn, *args, seed: int = 0, **kwargs):
    """Build a model with a seeded, local RNG state (model constructors draw from the global RNG)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn(*args, **kwargs).eval()


def assert_token_map(tokens: torch.Tensor, pooled: torch.Tensor, shape: tuple) -> None:
    """The map has `shape` and its row 0 is the library's pooled embedding (<= 1e-5)."""
    assert tuple(tokens.shape) == shape
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-5, atol=1e-5)
    # The patch rows are not copies of the CLS row (a broken adapter could repeat it).
    assert not torch.allclose(tokens[:, 1], tokens[:, 0])


def assert_head_runs(tokens: torch.Tensor) -> None:
    """`MUSEHead` accepts the map as a one-frame video `(1, N, 1+H*W, D)` and returns `(1, N, D)`."""
    from muse_pyramid import MUSEHead

    head = build(MUSEHead, tokens.shape[-1], depth=1)
    out = head(tokens.unsqueeze(0), torch.ones(1, tokens.shape[0], dtype=torch.bool))
    assert out.shape == (1, tokens.shape[0], tokens.shape[-1])
    assert torch.isfinite(out).all()
