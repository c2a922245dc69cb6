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
        ("open_clip", "openclip", lambda: backbones.open_clip_tokens(torch.nn.Linear(1, 1), torch.zeros(1, 3, 8, 8))),
        ("open_clip", "openclip", lambda: backbones.build_open_clip_from_openai({})),
        ("open_clip", "openclip", lambda: backbones.clip_tokenize(["a cat"], 8)),
        ("timm", "timm", lambda: backbones.timm_clip_tokens(torch.nn.Linear(1, 1), torch.zeros(1, 3, 8, 8))),
        ("timm", "timm", lambda: backbones.openai_to_timm_state_dict({}, torch.nn.Linear(1, 1))),
        ("transformers", "hf", lambda: backbones.hf_clip_tokens(torch.nn.Linear(1, 1), torch.zeros(1, 3, 8, 8))),
    ],
)
def test_missing_library_names_the_extra(monkeypatch, module, extra, call):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=rf"pip install 'muse-pyramid\[{extra}\]'"):
        call()


def test_named_extras_exist_and_need_no_normalising():
    """Every extra an error message or the README names is declared in pyproject.toml, spelled as
    its normalised name (PEP 685), so `pip install 'muse-pyramid[<extra>]'` works on pips old and new."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from muse_pyramid.backbones._common import EXTRAS

    root = Path(__file__).resolve().parents[2]
    declared = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    readme = (root / "README.md").read_text() + (root / ".ci" / "run").read_text()
    named = set(EXTRAS.values()) | {e for group in re.findall(r'\.\[([\w,.-]+)\]', readme) for e in group.split(",")}
    assert named <= declared, named - declared
    assert all(name == re.sub(r"[-_.]+", "-", name).lower() for name in declared), declared
