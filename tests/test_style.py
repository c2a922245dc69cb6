"""Repository hygiene: ruff is clean, and the library keeps its own rules (no print, no .cuda(), lazy extras)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "muse_pyramid"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install muse-pyramid[test])")
def test_ruff_clean():
    paths = [p for p in ("muse_pyramid", "examples", "tests", "benchmarks") if (ROOT / p).exists()]
    result = subprocess.run(["ruff", "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_rules():
    bad = []
    for path in LIBRARY.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.cuda\(\)|^\s*print\(|weights_only\s*=\s*False|import pdb", line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
            if re.match(r"(import|from) (open_clip|timm|transformers|av|mamba_ssm|causal_conv1d|safetensors)\b", line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: top-level optional import: {line.strip()}")
    assert bad == []


def test_import_pulls_in_no_optional_package():
    code = (
        "import sys, muse_pyramid, muse_pyramid.ops;"
        "heavy = {'open_clip', 'timm', 'transformers', 'av', 'mamba_ssm', 'causal_conv1d', 'torchvision'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
