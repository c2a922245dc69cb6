"""Optional dependencies: `import muse_pyramid` loads no backbone library; a missing one names its extra."""

import subprocess
import sys

import pytest
import torch

from muse_pyramid import backbones

BACKBONE_LIBRARIES = ("open_clip", "timm", "transformers", "torchvision", "av")


def test_import_loads_no_backbone_library():
    code = (
        "import sys, muse_pyramid, muse_pyramid.backbones; "
        f"print(sorted(m for m in {BACKBONE_LIBRARIES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module, extra, call",
    [
        ("open_clip", "open_clip", lambda: backbones.open_clip_tokens(torch.nn.Linear(1, 1), torch.zeros(1, 3, 8, 8))),
        ("open_clip", "open_clip", lambda: backbones.build_open_clip_from_openai({})),
        ("open_clip", "open_clip", lambda: backbones.clip_tokenize(["a cat"], 8)),
        ("timm", "timm", lambda: backbones.timm_clip_tokens(torch.nn.Linear(1, 1), torch.zeros(1, 3, 8, 8))),
        ("timm", "timm", lambda: backbones.openai_to_timm_state_dict({}, torch.nn.Linear(1, 1))),
        ("transformers", "hf", lambda: backbones.hf_clip_tokens(torch.nn.Linear(1, 1), torch.zeros(1, 3, 8, 8))),
    ],
)
def test_missing_library_names_the_extra(monkeypatch, module, extra, call):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=rf"pip install 'muse-pyramid\[{extra}\]'"):
        call()
