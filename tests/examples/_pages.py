"""Checks of the HTML pages the pipeline writes (report, search results): parse them, and render them in a
headless Chromium when one is installed (the tests that need it skip with the reason otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import unquote

import pytest

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class PageParser(HTMLParser):
    """Collects every `<img src>`, the report's query sections (`data-gt`) with their figures, the search
    page's hits (`data-path`) and the `<body>` attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.images: List[str] = []
        self.sections: List[Dict] = []
        self.hits: List[Dict[str, str]] = []
        self.body: Dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        cls = a.get("class", "").split()
        if tag == "body":
            self.body = a
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "section" and "query" in cls:
            self.sections.append({"gt": a.get("data-gt"), "figures": [], "runs": 0})
        elif tag == "div" and "run" in cls and self.sections:
            self.sections[-1]["runs"] += 1
        elif tag == "figure" and self.sections:
            self.sections[-1]["figures"].append({"video": a.get("data-video-id"), "correct": "correct" in cls,
                                                 "outside": "outside" in cls})
        elif tag == "li" and "hit" in cls:
            self.hits.append({"path": a.get("data-path", ""), "rank": a.get("data-rank", "")})


def parse_page(html_text: str) -> PageParser:
    p = PageParser()
    p.feed(html_text)
    return p


def check_page_files(page: Path) -> PageParser:
    """Parse `page`; every image it shows must be a file relative to it (no network, no server)."""
    parsed = parse_page(page.read_text(encoding="utf-8"))
    assert parsed.images, "the page shows no image"
    for src in parsed.images:
        assert "://" not in src and not src.startswith("/"), src
        assert (page.parent / unquote(src)).is_file(), f"{page.name}: missing image {src}"
    return parsed


def browser() -> Optional[str]:
    exe = os.environ.get("CHROME")
    if exe:
        return exe
    return next((shutil.which(b) for b in _BROWSERS if shutil.which(b)), None)


def render(page: Path) -> PageParser:
    """The DOM of `page` after a headless Chromium loaded it (skips the test without a browser)."""
    exe = browser()
    if exe is None:
        pytest.skip("no headless browser (chromium) installed; on Debian: apt-get install chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = parse_page(out.stdout)
    assert dom.body.get("data-images-total"), f"the page's load check did not run: {out.stdout[:500]}"
    return dom


def assert_images_load(page: Path) -> PageParser:
    """Render `page` and check that every image loaded (`data-images-broken` = 0)."""
    dom = render(page)
    total, broken = int(dom.body["data-images-total"]), int(dom.body["data-images-broken"])
    assert total == len(dom.images) > 0 and broken == 0, (total, broken)
    return dom
