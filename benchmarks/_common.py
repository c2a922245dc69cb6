"""Shared helpers of the benchmark scripts: timing, peak memory, isolated runs, JSON, tables, fits.

Not part of the library. Every script in `benchmarks/` prints a Markdown table and writes JSON; none
of them asserts anything about speed.

Peak memory is the peak *extra* memory of one call, on top of what is resident before it
(parameters, inputs, the framework itself):

- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` before the call,
  after ``torch.cuda.reset_peak_memory_stats()``. Allocator caching and fragmentation are excluded.
- CPU: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) minus its
  resident set (``VmRSS``) just before the call. Before the call, freed heap memory is handed back to
  the OS (``malloc_trim``) and the high-water mark is reset to the current resident set by writing
  ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0). Where that reset is not possible, the
  high-water mark is ``resource.getrusage(...).ru_maxrss``, which only ever grows, so the first call
  in a fresh process is measured; the scripts run every configuration in its own subprocess for
  that reason. The JSON records which method gave each number.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "examples"):  # a checkout without installing the package; the pipeline as `tvr`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
WORKER_FLAG = "--worker"
RESULT_PREFIX = "BENCH_RESULT "
MIB = 2**20


# ----------------------------------------------------------------------------------------- setup


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Flags every benchmark script shares."""
    parser.add_argument("--quick", action="store_true", help="a run of under a minute (small sizes, one repeat)")
    parser.add_argument("--out", default=default_out, help="JSON output path (a .md table is written beside it)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (or 'cuda:N')")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (the first one measures memory)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument(
        "--budget_s", type=float, default=60.0,
        help="per configuration and mode: stop repeating once this much time has been spent (at least 2 runs); "
        "a memory call longer than this is taken as the only timed run",
    )
    parser.add_argument("--timeout_s", type=float, default=1800.0, help="kill a configuration's subprocess after this")
    parser.add_argument(WORKER_FLAG, default=None, help=argparse.SUPPRESS)


def add_amp_arg(parser: argparse.ArgumentParser) -> None:
    """`--amp {auto,on,off}`: bf16 autocast; auto is on for CUDA, off for the CPU (see `amp_enabled`)."""
    parser.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                        help="bf16 autocast (auto: on for CUDA, off for CPU)")


def amp_enabled(choice: str, device: torch.device) -> bool:
    """What `--amp` means on `device`."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def configure_torch(threads: Optional[int]) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return out.stdout.rstrip()  # not strip(): porcelain lines start with a status column
    except OSError:
        return ""


def machine_info(device: torch.device) -> Dict[str, Any]:
    """Where and with what the numbers were measured."""
    import muse_pyramid
    from muse_pyramid.ops import conv_backend, scan_backend

    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "muse_pyramid": muse_pyramid.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_library_files": [line[3:] for line in _git("status", "--porcelain", "--", "muse_pyramid").splitlines()],
        "device": str(device),
        "scan_backend": scan_backend(device),
        "conv_backend": conv_backend(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: other work on the machine inflates times."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, budget_s: float,
    first_call_s: Optional[float] = None,
) -> Dict[str, Any]:
    """Median wall time of `fn` after `warmup` untimed calls.

    Runs `repeats` timed calls, or fewer (but at least 2, or 1 when `repeats` is 1) once `budget_s`
    seconds of timed calls have been spent, so the longest configurations stay affordable.
    `first_call_s`, the duration of a call made just before (the memory measurement), counts as a
    warm-up; when it alone exceeds `budget_s`, start-up costs are negligible beside it, so it is
    taken as the only timed run and `fn` is not called again (``"first_call_only": True``).
    """
    if first_call_s is not None and first_call_s > budget_s:
        return {"median_s": first_call_s, "min_s": first_call_s, "runs_s": [first_call_s], "first_call_only": True}
    for _ in range(warmup):
        fn()
        synchronize(device)
    runs: List[float] = []
    while len(runs) < repeats:
        start = time.perf_counter()
        fn()
        synchronize(device)
        runs.append(time.perf_counter() - start)
        if sum(runs) >= budget_s and len(runs) >= min(2, repeats):
            break
    return {"median_s": statistics.median(runs), "min_s": min(runs), "runs_s": runs, "first_call_only": False}


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Dict[str, Any]:
    """Peak extra memory of one call of `fn`, in bytes, the method that measured it (module docstring)
    and the call's wall time in seconds (``"call_s"``)."""
    start = time.perf_counter()
    out = _peak_memory(fn, device)
    return {**out, "call_s": time.perf_counter() - start}


def _peak_memory(fn: Callable[[], Any], device: torch.device) -> Dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "method": "cuda_max_memory_allocated"}
    _malloc_trim()
    base_kib = _proc_status_kib("VmRSS")
    if base_kib is not None and _reset_rss_peak():
        fn()
        peak_kib = _proc_status_kib("VmHWM")
        if peak_kib is not None:
            return {"peak_bytes": max(peak_kib - base_kib, 0) * 1024, "method": "rss_hwm_reset"}
    # ru_maxrss is in KiB on Linux; it only grows, so this is right for the first large call of a process
    rss_now = (base_kib or 0) * 1024
    fn()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": max(maxrss - rss_now, 0), "method": "ru_maxrss"}


# --------------------------------------------------------------------------- isolated subprocess


def run_worker(script: str, payload: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
    """Run `script --worker <payload>` in a fresh interpreter and return the dict it reports.

    A crash, an out-of-memory kill or a timeout becomes ``{"error": ...}`` so a sweep goes on.
    """
    cmd = [sys.executable, script, WORKER_FLAG, json.dumps(payload)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit code {proc.returncode}: {' | '.join(tail)}"}


def report_worker_result(result: Dict[str, Any]) -> None:
    """The worker side of `run_worker`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------- output


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x); None with fewer than two distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Iterable[Dict[str, Any]], columns: Sequence[tuple]) -> str:
    """`columns` holds (header, key) pairs; missing keys print as '-'."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)


def write_outputs(out: str, payload: Dict[str, Any], table: str) -> Path:
    """Write the JSON to `out` and the Markdown table beside it (same stem, .md); returns the JSON path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    return path
