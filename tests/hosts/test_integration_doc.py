"""docs/integration.md embeds docs/patches/clip4clip.patch verbatim (the file is the source of truth)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_guide_embeds_the_patch_file_verbatim():
    guide = (ROOT / "docs" / "integration.md").read_text()
    match = re.search(r"<!-- clip4clip.patch: begin[^>]*-->\n```diff\n(.*?)```\n<!-- clip4clip.patch: end -->", guide, re.S)
    assert match, "docs/integration.md lost its embedded copy of docs/patches/clip4clip.patch"
    assert match.group(1) == (ROOT / "docs" / "patches" / "clip4clip.patch").read_text()


def test_guide_and_patch_spell_the_header_as_the_release():
    guide = (ROOT / "docs" / "integration.md").read_text()
    assert "--sim_header MUSE" in guide and "--sim_header muse" not in guide
    assert '"MUSE"' in (ROOT / "docs" / "patches" / "clip4clip.patch").read_text()
