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


def _module_graph() -> dict:
    """Module -> modules it imports (anywhere: top level, inside functions, under TYPE_CHECKING), for the
    library (`muse_pyramid`) and the pipeline (`tvr`, i.e. `examples/tvr`)."""
    import ast

    files = {}
    for package, base in (("muse_pyramid", LIBRARY), ("tvr", ROOT / "examples" / "tvr")):
        for path in base.rglob("*.py"):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name and not name.startswith(t + ".")}
    return graph


def test_no_import_cycles_in_the_library_or_the_pipeline():
    graph = _module_graph()
    assert "tvr.cli" in graph and "muse_pyramid.head" in graph
    cycles = []

    def visit(node, path, done):
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                done.add(nxt)
                visit(nxt, path + [nxt], done)

    for start in sorted(graph):
        visit(start, [start], {start})
    assert cycles == [], f"import cycles: {cycles[:5]}"


def test_the_pipeline_is_imported_under_one_name():
    """`tvr` (the entry scripts put `examples/` on sys.path); `examples.tvr` would load every module twice."""
    assert not (ROOT / "examples" / "__init__.py").exists()
    offenders = [str(p.relative_to(ROOT)) for folder in ("examples", "tests", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py")
                 if p != Path(__file__).resolve() and re.search(r"\bexamples\.tvr\b", p.read_text())]
    assert offenders == []
