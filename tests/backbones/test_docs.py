"""The quick start of docs/integration.md runs offline, on a fake ViT-B/32 archive with random weights."""

import re
from pathlib import Path

import pytest
import torch
from backbone_helpers import make_openai_clip, trace_openai_archive

pytest.importorskip("open_clip")
pytestmark = pytest.mark.backbones

DOC = Path(__file__).resolve().parents[2] / "docs" / "integration.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    # ViT-B/32's geometry and embedding width with a narrow one-block trunk; CLIP's real vocabulary size.
    model = make_openai_clip(embed_dim=512, image_resolution=224, vision_width=64, vision_layers=1,
                             vision_patch_size=32, context_length=77, vocab_size=49408,
                             transformer_width=64, transformer_layers=1)
    trace_openai_archive(model, tmp_path / "ViT-B-32.pt")
    monkeypatch.setenv("MUSE_PYRAMID_CLIP_DIR", str(tmp_path))
    section = DOC.read_text().split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    assert namespace["tokens"].shape == (2, 4, 50, 512)
    assert (namespace["tokens"][1, 2:] == 0).all()  # padded frames are not encoded
    assert namespace["video"].shape == (2, 512) and namespace["scores"].shape == (1, 2)
    torch.testing.assert_close(namespace["video"].norm(dim=-1), torch.ones(2))
