"""The benchmark scripts run (``--quick``) and write the JSON, table and plot they promise.

No timing thresholds: only that every row is there, numbers are positive and the summaries hold the
keys `docs/benchmarks.md` reads. Also the helpers' measurement properties in `benchmarks/_common.py`.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muse_pyramid import MUSEHead

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
HEADS = ("meanP", "bimamba", "mamba", "attention")


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, tmp_path, *args):
    out = tmp_path / f"{Path(script).stem}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out), *args],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").read_text().startswith("| ")
    return json.loads(out.read_text()), out


def _check_machine(machine):
    for key in ("cpu", "torch", "torch_threads", "scan_backend", "git_commit", "load_average_before"):
        assert key in machine, key
    assert machine["torch"] == torch.__version__


@pytest.mark.slow
def test_bench_head_quick(tmp_path):
    pytest.importorskip("matplotlib")
    payload, out = _run("bench_head.py", tmp_path, "--points", "1x7", "2x7")
    _check_machine(payload["machine"])
    rows = payload["rows"]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    settings = payload["settings"]
    ref = MUSEHead(settings["dim"], depth=1)
    assert sorted((r["head"], r["frames"]) for r in rows) == sorted((h, f) for h in HEADS for f in (1, 2))
    for r in rows:
        assert r["seq_len"] == ref.sequence_length(r["frames"], (r["grid"], r["grid"]))
        assert r["input_tokens"] == r["frames"] * (1 + r["grid"] ** 2)
        for key in ("fwd_s", "fwdbwd_s", "fwd_min_s", "fwdbwd_min_s"):
            assert r[key] > 0 and math.isfinite(r[key]), (r["label"], key)
        assert r["fwd_peak_mib"] >= 0 and r["fwdbwd_peak_mib"] >= 0
        assert (r["params"] == 0) == (r["head"] == "meanP")
        if r["head"] in ("bimamba", "mamba"):
            assert r["scan_backend_used"]
    # equal width and depth: one head's size per mixer, and BiMamba's backward set makes it the largest
    params = {r["head"]: r["params"] for r in rows}
    assert params["bimamba"] > params["mamba"] > 0 and params["attention"] > 0
    slopes = payload["summary"]["loglog_slopes"]
    assert set(slopes) == set(HEADS)
    assert all(isinstance(slopes[h]["fwdbwd_s"], float) for h in HEADS)
    ratios = payload["summary"]["attention_vs_bimamba"]
    assert sorted(r["seq_len"] for r in ratios) == sorted({r["seq_len"] for r in rows})
    assert all(r["fwdbwd_attention_over_bimamba"] > 0 for r in ratios)
    png = out.with_suffix(".png")
    assert payload["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("from_cache", [False, True], ids=["clip", "from_cache"])
def test_bench_step_quick(tmp_path, from_cache):
    pytest.importorskip("open_clip")
    payload, _ = _run("bench_step.py", tmp_path, *(["--from_cache"] if from_cache else []))
    _check_machine(payload["machine"])
    assert payload["benchmark"] == ("step_from_cache" if from_cache else "step")
    rows = {r["head"]: r for r in payload["rows"]}
    assert set(rows) == {"meanP", "MUSE"}
    for r in rows.values():
        assert "error" not in r, r["error"]
        assert r["step_s"] > 0 and r["step_min_s"] > 0 and r["step_peak_mib"] >= 0
        assert len(r["step_runs_s"]) >= 1
    assert rows["MUSE"]["head_params"] > 0 and rows["meanP"]["head_params"] == 0
    assert rows["MUSE"]["trainable_params"] == rows["meanP"]["trainable_params"] + rows["MUSE"]["head_params"]
    grid = rows["MUSE"]["grid"]
    assert rows["MUSE"]["seq_len"] == MUSEHead(rows["MUSE"]["dim"], grid=tuple(grid)).sequence_length(
        rows["MUSE"]["frames"], tuple(grid))
    ratios = payload["ratios"]
    assert ratios["step_time_muse_over_meanp"] == pytest.approx(rows["MUSE"]["step_s"] / rows["meanP"]["step_s"])
    assert ratios["step_peak_muse_over_meanp"] > 0
    if not from_cache:  # the head adds matmul and conv work on top of CLIP's
        assert rows["MUSE"]["step_gflop"] > rows["meanP"]["step_gflop"] > 0
        assert ratios["step_gflop_muse_over_meanp"] > 1


def test_loglog_slope_recovers_power():
    common = _load_common()
    xs = [3060, 6120, 12360, 16320]
    assert common.loglog_slope(xs, [3e-9 * x**2 for x in xs]) == pytest.approx(2.0)
    assert common.loglog_slope(xs, [5e-4 * x for x in xs]) == pytest.approx(1.0)
    assert common.loglog_slope([10], [1.0]) is None


def test_peak_memory_sees_a_transient_allocation():
    common = _load_common()
    size = 256 * 2**20

    def allocate():
        x = torch.ones(size // 4)  # 256 MiB, touched, then freed
        return float(x[-1])

    mem = common.peak_memory(allocate, torch.device("cpu"))
    if mem["method"] != "rss_hwm_reset":
        pytest.skip("resident-set peak cannot be reset here; the scripts fall back to one process per run")
    assert size * 0.95 <= mem["peak_bytes"] <= size * 1.5
    idle = common.peak_memory(lambda: None, torch.device("cpu"))
    assert idle["peak_bytes"] < size * 0.1


def test_markdown_table_marks_missing_values():
    common = _load_common()
    text = common.markdown_table([{"a": 1234, "b": 0.000123}, {"a": 2}], [("A", "a"), ("B", "b")])
    assert text.splitlines() == ["| A | B |", "|---|---|", "| 1,234 | 0.000123 |", "| 2 | - |"]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """`gpu_check.py --device cpu --small` runs every part (parity, head cost, training step) and the
    parities hold on the CPU, where the automatic kernels and the portable path agree to fp32 precision."""
    pytest.importorskip("open_clip")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--small", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    _check_machine(payload["machine"])
    assert payload["mamba_ssm_fused_path"] is False
    parity = payload["parity"]
    assert sorted((r["module"], r["dtype"]) for r in parity) == sorted(
        (m, d) for m in ("BiMamba", "MUSEHead") for d in ("fp32", "bf16 autocast")
    )
    for r in parity:
        limit = 1e-4 if r["dtype"] == "fp32" else 0.1
        for key in ("kernels_vs_portable", "kernels_vs_cpu_fp32", "portable_vs_cpu_fp32"):
            assert r[key]["worst"] <= limit, (r["module"], r["dtype"], key, r[key])
    heads = payload["head"]
    assert {r["head"] for r in heads} == {"bimamba kernels", "bimamba portable", "attention (SDPA)"}
    assert all(r["fwdbwd_s"] > 0 and r["peak_mib"] >= 0 for r in heads), heads
    assert [r["head"] for r in payload["step"]] == ["meanP", "MUSE"]
    assert all(r["step_s"] > 0 for r in payload["step"]), payload["step"]
