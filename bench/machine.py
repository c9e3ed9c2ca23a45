"""The machine a benchmark runs on: what it is (for the results JSON) and how busy it is
(a shared machine distorts timings). Standard library only: importing it imports no torch."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The first "model name" of /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far (/proc/stat); (0, 0) where unavailable."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def wait_quiet(max_s: float, window_s: float = 3.0, busy_max: float = 0.1) -> float:
    """Wait up to `max_s` seconds for a `window_s` stretch in which the CPUs are less than
    `busy_max` busy (other work on a shared machine distorts the time); returns the wait."""
    t0 = time.time()
    while time.time() - t0 < max_s:
        b0, n0 = busy_jiffies()
        time.sleep(window_s)
        b1, n1 = busy_jiffies()
        if n1 == n0 or (b1 - b0) / (n1 - n0) < busy_max:
            break
    return time.time() - t0


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def other_load():
    """Yields a dict whose "share" is, after the block, the share of the machine's CPU time
    that other processes used while the block ran (0..1)."""
    out = {"share": 0.0}
    busy0, total0 = busy_jiffies()
    own0 = _own_cpu_s()
    yield out
    busy1, total1 = busy_jiffies()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total_s = (total1 - total0) / hz
    others_s = (busy1 - busy0) / hz - (_own_cpu_s() - own0)
    out["share"] = max(0.0, others_s / total_s) if total_s > 0 else 0.0


def _git(*args: str) -> str:
    cmd = ["git", "--no-optional-locks", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def environment() -> dict:
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_model": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_bytes": mem_total_bytes(),
        "python": platform.python_version(),
    }
    try:  # the code that runs: commit, and whether tracked files differ from it (read-only git)
        env["git_commit"] = _git("rev-parse", "--short", "HEAD")
        env["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        pass
    # the versions the timed command imports, without importing torch here
    code = "import json, torch, transformers; print(json.dumps([torch.__version__, transformers.__version__]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    env["torch"], env["transformers"] = json.loads(out)
    return env


def write_results(path: Path, data: dict) -> None:
    """A benchmark's results as indented JSON at `path` (folders made; written to a
    temporary file, then renamed, so an interrupted run never leaves half a file that
    bench/tables.py would read). Values JSON cannot hold are written as str()."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
