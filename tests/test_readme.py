"""The README's usage snippet runs and prints what it says; the CI script runs the README's test command."""

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_usage_snippet_runs():
    snippet = _blocks("python")[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "README.md", "exec"), {})
    assert out.getvalue().strip() == "torch.Size([2, 12, 512]) torch.Size([2, 512])"


def test_ci_runs_the_readme_test_command():
    test_command = next(b.strip() for b in _blocks("bash") if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
    assert not any(re.search(r"pip install[^#]*\btorch\b(?!==)", line) for line in ci if "torch" in line)
