"""The text side shared by the retrieval examples: offline CLIP tokenisation and EOT text features.

`clip_tokenize` uses the CLIP BPE vocabulary that open_clip ships inside its wheel, so it needs no
network. The layout is CLIP4Clip's: ``[start] + tokens[:max_words-2] + [end]``, zero padded; a long
caption keeps its end token (the text feature is read there).

Shape letters: N texts, M = max_words tokens, D embedding width.
Tests: ``tests/backbones/test_text.py``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._common import require
from .hf_clip import check_hf_tokenizer

__all__ = ["clip_tokenize", "open_clip_text_features"]


def clip_tokenize(texts: Union[str, Sequence[str]], max_words: int = 77, tokenizer: Optional[Any] = None) -> torch.Tensor:
    """Token ids of CLIP's BPE, ``[start] + tokens[:max_words-2] + [end]``, zero padded.

    Args:
        texts: a caption or a list of N captions (lower-cased and whitespace-cleaned as CLIP does).
        max_words: M, the length of every row (77 for CLIP's text tower; CLIP4Clip uses 32).
        tokenizer: None for open_clip's bundled vocabulary (offline), or a Hugging Face CLIP
            tokenizer, which is checked with `check_hf_tokenizer` first (offline it may be broken).

    Returns:
        `(N, M)` LongTensor. The end token is the largest id in each row, so ``argmax`` finds it.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 2:
        raise ValueError(f"max_words must be an int >= 2 (start and end tokens), got {max_words!r}")
    if tokenizer is None:
        # open_clip keeps [start] + tokens[:M-2] + [end] when it truncates (it overwrites the last slot).
        return require("open_clip").tokenize(list(texts), context_length=max_words).long()
    check_hf_tokenizer(tokenizer)
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = torch.zeros(len(ids), max_words, dtype=torch.long)
    for row, words in enumerate(ids):
        words = [start, *words[: max_words - 2], end]
        out[row, : len(words)] = torch.tensor(words, dtype=torch.long)
    return out


def open_clip_text_features(model: nn.Module, text_ids: torch.Tensor) -> torch.Tensor:
    """Projected text features at the end-of-text token, not normalised.

    Args:
        model: an open_clip ``CLIP`` or an OpenAI-layout CLIP (anything with ``encode_text``) whose
            text tower pools at the ``argmax`` id (the end token), as CLIP does.
        text_ids: `(N, M)` integer ids from `clip_tokenize`.

    Returns:
        `(N, D)`: ``ln_final`` output at the end token, times ``text_projection``. Rows shorter than the
        model's ``context_length`` (CLIP4Clip's 32 words) are zero padded to it, which leaves the
        feature at the end token unchanged because CLIP's text attention is causal.
    """
    if not isinstance(text_ids, torch.Tensor) or text_ids.ndim != 2 or text_ids.is_floating_point():
        got = f"shape {tuple(text_ids.shape)}, dtype {text_ids.dtype}" if isinstance(text_ids, torch.Tensor) else type(text_ids).__name__
        raise ValueError(f"text_ids must be an integer tensor of shape (N, M), got {got}")
    if not hasattr(model, "encode_text"):
        raise TypeError(f"model must be a CLIP with encode_text (open_clip or OpenAI layout), got {type(model).__name__}")
    context = getattr(model, "context_length", None)
    if isinstance(context, int):
        if text_ids.shape[1] > context:
            raise ValueError(
                f"text_ids has {text_ids.shape[1]} tokens per text, more than the model's context_length={context}"
            )
        # CLIP's text attention is causal, so zeros after the end token leave its feature unchanged.
        text_ids = F.pad(text_ids, (0, context - text_ids.shape[1]))
    return model.encode_text(text_ids)
