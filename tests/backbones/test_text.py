"""Offline tokenisation: CLIP4Clip's layout, the end token kept on truncation, the broken HF tokenizer."""

import pytest
import torch

from muse_pyramid.backbones import check_hf_tokenizer, clip_tokenize

open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.backbones

CAPTIONS = ["A man is  Playing the GUITAR on stage.", "a cat", "word " * 100]


def reference(text: str, max_words: int) -> list:
    """CLIP4Clip's rule, written out: [start] + tokens[:max_words-2] + [end], zero padded."""
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    start, end = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]
    ids = [start, *tokenizer.encode(text)[: max_words - 2], end]
    return ids + [0] * (max_words - len(ids))


@pytest.mark.parametrize("max_words", [4, 32, 77])
def test_layout_matches_clip4clip(max_words):
    ids = clip_tokenize(CAPTIONS, max_words)
    assert ids.dtype == torch.long and ids.shape == (len(CAPTIONS), max_words)
    assert ids.tolist() == [reference(t, max_words) for t in CAPTIONS]
    # The end token (49407) is the row's largest id, so CLIP's argmax pooling finds it, also when truncated.
    ends = ids.argmax(dim=-1)
    assert (ids[torch.arange(len(CAPTIONS)), ends] == 49407).all()
    assert ends[-1] == max_words - 1


def test_lowercases_and_single_string():
    assert torch.equal(clip_tokenize("A CAT", 8), clip_tokenize(["a cat"], 8))
    with pytest.raises(ValueError, match="max_words must be an int >= 2"):
        clip_tokenize("a cat", 1)


def test_broken_offline_hf_tokenizer_is_rejected():
    transformers = pytest.importorskip("transformers")
    # What from_pretrained gives without its vocabulary files: 2 entries, every word -> the same id.
    broken = transformers.CLIPTokenizer()
    assert len(broken) < 10
    with pytest.raises(ValueError, match="tokenizer is broken: CLIPTokenizer has 2 vocabulary entries"):
        check_hf_tokenizer(broken)
    with pytest.raises(ValueError, match="tokenizer is broken"):
        clip_tokenize(CAPTIONS, 32, tokenizer=broken)
