"""Quickstart wall time: `distrib-gpt train --config configs/quickstart.yaml`, timed end to end.

The command runs as a subprocess with its run directory and data cache in a fresh temporary
directory (`run.out_dir=...`, `data.cache_dir=...`), so the time includes data preparation and
nothing in the checkout is read from or written to a cache. Recorded: the wall time of the whole
command, figures from the run's summary.json (training loss by epoch, real tokens/s, optimizer
steps, ...), the share of the CPUs other processes used meanwhile (a shared machine distorts
the time), and the environment (date, CPU model from /proc/cpuinfo, core count, memory, torch, git commit).

    python bench/quickstart.py --out bench/results/quickstart.json     # ~2 minutes on 2 idle cores
    python bench/quickstart.py --quiet-wait 300                        # first wait for idle CPUs

`python bench/tables.py` turns the JSON into the "Quickstart wall time" table of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import busy_jiffies, environment, wait_quiet, write_results  # noqa: E402
CONFIG = "configs/quickstart.yaml"
# copied from the run's summary.json
SUMMARY_KEYS = (
    "train_loss_by_epoch", "val_loss_by_epoch", "tokens_per_s", "steps", "epochs_completed",
    "mean_epoch_time_s", "params", "wall_time_s", "precision", "device",
)


def children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def distrib_gpt_exe() -> str:
    """The `distrib-gpt` next to this Python (its virtualenv), else the one on PATH."""
    here = Path(sys.executable).parent / "distrib-gpt"
    found = str(here) if here.exists() else shutil.which("distrib-gpt")
    if not found:
        sys.exit("error: no distrib-gpt executable next to this Python or on PATH (pip install -e .)")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/quickstart.json", help="JSON written here")
    p.add_argument(
        "--quiet-wait", type=float, default=0.0,
        help="first wait up to this many seconds for the CPUs to be idle (shared machines)",
    )
    args = p.parse_args()
    own_command = "python bench/quickstart.py" + (f" --quiet-wait {args.quiet_wait:g}" if args.quiet_wait else "")

    env = environment()  # before the run: the code and versions it runs with
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run.out_dir={tmp}/runs", f"data.cache_dir={tmp}/cache"]
        cmd = [distrib_gpt_exe(), "train", "--config", CONFIG, *overrides]
        if args.quiet_wait:
            print(f"waited {wait_quiet(args.quiet_wait):.0f} s for idle CPUs", flush=True)
        print("running:", " ".join(cmd), flush=True)
        busy0, total0 = busy_jiffies()
        own0 = children_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        wall = time.perf_counter() - t0
        busy1, total1 = busy_jiffies()
        if proc.returncode != 0:
            sys.exit(f"error: the quickstart command failed (exit status {proc.returncode}); nothing written")
        summary = json.loads((Path(tmp) / "runs/quickstart/summary.json").read_text())

    hz = os.sysconf("SC_CLK_TCK")
    cpu_s = (total1 - total0) / hz
    others_s = (busy1 - busy0) / hz - (children_cpu_s() - own0)
    result = {
        "command": f"{own_command} --out {_relative(args.out)}",
        "timed_command": f"distrib-gpt train --config {CONFIG} run.out_dir=TMP/runs data.cache_dir=TMP/cache",
        "wall_time_s": wall,
        "other_cpu_share": max(0.0, others_s / cpu_s) if cpu_s > 0 else None,
        "summary": {k: summary.get(k) for k in SUMMARY_KEYS},
        "environment": env,
    }
    write_results(args.out, result)
    s = result["summary"]
    print(
        f"\nwall {wall:.1f} s | steps {s['steps']} | tokens/s {s['tokens_per_s']:,.0f} | train loss by epoch "
        f"{[round(x, 2) for x in s['train_loss_by_epoch']]} | other processes {result['other_cpu_share'] or 0:.0%} "
        f"of the CPUs | {args.out}"
    )


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
