"""`distrib-gpt sweep`: grid parsing and validation before anything runs, a tiny CPU
sweep (precision fp32/bf16 x LoRA off/on), skipping finished cells, resuming a half-done
one, and failed cells recorded with their exit codes.

The 4-cell sweep runs once per test session (`shared_sweep`); tests/test_report.py
reports on the same runs. Tests that change a sweep work on a copy of it. Every `python
-m distrib_gpt` process imports torch (seconds on a loaded 2-core machine), so the
command line runs in-process (`cli.main`) except for the shared sweep; the cells
themselves are always real processes.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distrib_gpt import cli as CLI
from distrib_gpt import sweep as S

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
GRID = ["--grid", "precision=fp32,bf16", "--grid", "lora.enabled=false,true"]
CELLS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
SWEEP_NAME = "tiny"


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`distrib-gpt ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "distrib_gpt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`distrib-gpt ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = CLI.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def tiny(cache: Path, out: Path) -> list[str]:
    """Overrides of configs/quickstart.yaml for a seconds-long CPU run."""
    return [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=64",
        "data.seq_len=64",
        "data.max_examples=64",
        "train.epochs=1",
        "train.max_steps=3",
        "train.progress=false",
        "eval.train_subset_batches=1",
        "eval.val_batches=1",
        f"data.cache_dir={cache}",
        f"run.out_dir={out}",
    ]


def sweep_args(base: Path, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
    """The tiny sweep's command line; `extra` overrides, `flags` options (argparse
    wants the options before the overrides)."""
    return [
        "sweep",
        "--config",
        QUICKSTART,
        *GRID,
        "--name",
        SWEEP_NAME,
        *flags,
        *tiny(base / "cache", base / "runs"),
        *extra,
    ]


def cell_dir(base: Path, precision: str, lora: bool) -> Path:
    return (
        base
        / "runs"
        / SWEEP_NAME
        / f"quickstart-precision={precision}-lora.enabled={str(lora).lower()}"
    )


_SHARED: dict = {}


def shared_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny 4-cell sweep, run once per session: (base directory, the sweep's
    process)."""
    if "sweep" not in _SHARED:
        base = tmp_path_factory.mktemp("tiny_sweep")
        result = cli(*sweep_args(base))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        _SHARED["sweep"] = (base, result)
    return _SHARED["sweep"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    return shared_sweep(tmp_path_factory)


def manifest(base: Path) -> dict:
    return json.loads((base / "runs" / SWEEP_NAME / "sweep.json").read_text())


def copy_sweep(base: Path, dest: Path) -> Path:
    """A copy of a sweep's runs and data cache under `dest`, to change freely."""
    shutil.copytree(base / "runs", dest / "runs")
    shutil.copytree(base / "cache", dest / "cache")
    return dest


# ------------------------------------------------------------------- grid parsing


def test_values_split_at_top_level_commas_only():
    assert S.split_values("fp32,bf16") == ["fp32", "bf16"]
    assert S.split_values("[0.9,0.95],[0.9,0.99]") == ["[0.9,0.95]", "[0.9,0.99]"]
    assert S.split_values("'a,b', c") == ["'a,b'", "c"]
    assert S.parse_axis("optim.betas=[0.9,0.95],[0.9,0.99]") == S.Axis(
        "optim.betas", ("[0.9,0.95]", "[0.9,0.99]")
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("precision", "expected KEY=V1,V2"),
        ("precision=", "expected KEY=V1,V2"),
        ("precision=fp32,,bf16", "empty value"),
        ("precision=fp32,fp32", "repeated value"),
        ("run.name=a,b", "cannot be a grid axis"),
        ("resume=auto,null", "cannot be a grid axis"),
    ],
)
def test_bad_grid_flags_are_refused(spec, message):
    with pytest.raises(S.SweepError, match=message):
        S.parse_grid([spec])


def test_a_key_given_twice_is_refused():
    with pytest.raises(S.SweepError, match="precision: given twice"):
        S.parse_grid(["precision=fp32", "precision=bf16"])


def test_cells_are_the_cartesian_product_last_axis_fastest():
    cells = S.grid_cells(
        S.parse_grid(["precision=fp32,bf16", "lora.enabled=false,true"])
    )
    assert cells == [
        {"precision": "fp32", "lora.enabled": "false"},
        {"precision": "fp32", "lora.enabled": "true"},
        {"precision": "bf16", "lora.enabled": "false"},
        {"precision": "bf16", "lora.enabled": "true"},
    ]


def test_run_names_are_readable_safe_and_unique():
    names = S.cell_names(
        "qs", [{"precision": "bf16"}, {"data.source": "./a b/c.jsonl"}]
    )
    assert names == ["qs-precision=bf16", "qs-data.source=._a_b_c.jsonl"]
    # two values that slug to the same text get distinct hash suffixes instead
    clash = S.cell_names("qs", [{"data.source": "a/b"}, {"data.source": "a_b"}])
    assert clash[0] != clash[1] and all(
        n.startswith("qs-data.source=a_b-") and len(n.rsplit("-", 1)[1]) == 8
        for n in clash
    )
    long = S.cell_names("qs", [{"data.source": "x" * 300}])[0]
    assert len(long) <= S.MAX_NAME_LEN


@pytest.mark.parametrize(
    "grid, named",
    [
        (
            "precison=fp32,bf16",
            "unknown config key 'precison' (did you mean 'precision'?)",
        ),
        # the second cell is bad: the first, valid, must not run either
        ("precision=fp32,fp64", "precision: 'fp64' is not one of"),
        ("train.grad_accum=1,0", "train.grad_accum: must be >= 1, got 0"),
    ],
)
def test_a_bad_cell_fails_before_anything_runs(capsys, tmp_path, grid, named):
    code, out, err = run_cli(
        capsys,
        "sweep",
        "--config",
        QUICKSTART,
        "--grid",
        grid,
        *tiny(tmp_path / "cache", tmp_path / "runs"),
    )
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: cell ") and named in lines[0]
    ), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    assert "distrib_gpt.train" not in out


def test_dry_run_prints_torchrun_commands_and_runs_nothing(capsys, tmp_path):
    code, out, err = run_cli(
        capsys,
        *sweep_args(
            tmp_path,
            "parallel.strategy=ddp",
            flags=("--nproc-per-node", "2", "--dry-run"),
        ),
    )
    assert code == 0, err
    commands = [
        line.strip()[2:] for line in out.splitlines() if line.strip().startswith("$ ")
    ]
    assert len(commands) == 4
    for cmd, (precision, lora) in zip(commands, CELLS):
        assert (
            "-m torch.distributed.run --standalone --nproc-per-node 2 -m "
            "distrib_gpt.train --config " in cmd
        )
        assert (
            f"precision={precision}" in cmd
            and f"lora.enabled={str(lora).lower()}" in cmd
        )
        assert (
            f"run.name=quickstart-precision={precision}-lora.enabled={str(lora).lower()}"
            in cmd
        )
    assert not (tmp_path / "runs").exists()


def test_single_strategy_under_several_processes_is_refused(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, *sweep_args(tmp_path, flags=("--nproc-per-node", "2", "--dry-run"))
    )
    assert (
        code == 2
        and "parallel.strategy: 'single' cannot run under --nproc-per-node 2" in err
    )


# ------------------------------------------------------------------ a real sweep


def test_tiny_sweep_runs_every_cell(swept):
    base, result = swept
    m = manifest(base)
    assert [c["settings"] for c in m["cells"]] == [
        {"precision": p, "lora.enabled": str(lo).lower()} for p, lo in CELLS
    ]
    for record, (precision, lora) in zip(m["cells"], CELLS):
        run = cell_dir(base, precision, lora)
        assert (
            record["run_dir"] == str(run)
            and record["status"] == "done"
            and record["exit_code"] == 0
        )
        assert record["action"] == "run" and record["duration_s"] > 0
        # each cell's resolved command is printed
        assert f"$ {record['command']}" in result.stdout
        summary = json.loads((run / "summary.json").read_text())
        assert summary["precision"] == precision
        # LoRA trains the adapters only
        assert (summary["trainable_params"] < summary["params"]) == lora
        assert summary["steps"] == 3 and len(summary["train_loss_by_epoch"]) == 2
        assert Path(record["log"]).read_text().count("done | tokens/s") == 1
    assert m["status"] == "done" and "4 done" in result.stdout


def test_rerun_skips_finished_cells(capsys, swept, tmp_path):
    base = copy_sweep(swept[0], tmp_path)
    summaries = [cell_dir(base, p, lo) / "summary.json" for p, lo in CELLS]
    before = [s.stat().st_mtime_ns for s in summaries]
    code, out, err = run_cli(capsys, *sweep_args(base))
    assert code == 0, err
    assert [s.stat().st_mtime_ns for s in summaries] == before
    assert out.count(": skipped, ") == 4 and "$ " not in out
    first, m = manifest(swept[0]), manifest(base)
    assert [c["status"] for c in m["cells"]] == ["skipped"] * 4
    assert [c["action"] for c in m["cells"]] == ["skip"] * 4
    # a skipped cell keeps the record of the run that finished it
    for earlier, now in zip(first["cells"], m["cells"]):
        assert now["exit_code"] == 0 and now["duration_s"] == earlier["duration_s"] > 0


def test_half_done_cell_is_resumed(capsys, swept, tmp_path):
    base = copy_sweep(swept[0], tmp_path)
    half = cell_dir(base, "bf16", True)
    assert (half / "checkpoints" / "latest").exists()
    (half / "summary.json").unlink()  # as if the run died after its last checkpoint
    others = [
        cell_dir(base, p, lo) / "summary.json"
        for p, lo in CELLS
        if (p, lo) != ("bf16", True)
    ]
    before = [s.stat().st_mtime_ns for s in others]
    code, out, err = run_cli(capsys, *sweep_args(base))
    assert code == 0, out[-2000:] + err[-2000:]
    assert "[4/4] precision=bf16 lora.enabled=true: resuming" in out
    m = manifest(base)
    assert [c["action"] for c in m["cells"]] == ["skip", "skip", "skip", "resume"]
    assert [c["status"] for c in m["cells"]] == [
        "skipped",
        "skipped",
        "skipped",
        "done",
    ]
    assert m["cells"][3]["command"].endswith("resume=auto")
    summary = json.loads((half / "summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 3
    assert [s.stat().st_mtime_ns for s in others] == before


def test_a_run_of_another_config_in_a_cell_directory_is_refused(swept):
    with pytest.raises(
        S.SweepError,
        match=r"holds a run of a different config \(optim.lr: 0.001 vs 0.002",
    ):
        S.plan_sweep(
            QUICKSTART,
            [*tiny(swept[0] / "cache", swept[0] / "runs"), "optim.lr=1e-3"],
            GRID[1::2],
            name=SWEEP_NAME,
        )


def test_a_failing_cell_is_recorded_with_its_exit_code_and_error(capsys, tmp_path):
    missing = tmp_path / "missing.jsonl"
    code, out, err = run_cli(
        capsys,
        "sweep",
        "--config",
        QUICKSTART,
        "--grid",
        f"data.source={missing}",
        "--name",
        "bad",
        *tiny(tmp_path / "cache", tmp_path / "runs"),
    )
    assert code == 2
    (cell,) = json.loads((tmp_path / "runs" / "bad" / "sweep.json").read_text())[
        "cells"
    ]
    # 2: the trainer's exit status for bad input
    assert cell["status"] == "failed" and cell["exit_code"] == 2
    assert cell["error"].startswith("error:") and str(missing) in cell["error"]
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("error: sweep bad: 1 of 1 cells failed: ")
    )


# Cells whose process is a stand-in: the sweep's bookkeeping of exit codes does not
# depend on what the process is, and a real trainer costs seconds to start.
STAND_INS = {
    "ok": "import pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True); "
    "(d / 'summary.json').write_text('{}')",
    "exit3": "import sys; print('error: stand-in failure'); sys.exit(3)",
    "killed": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
}


def stand_in_plan(tmp_path, behaviours: list[str]) -> S.SweepPlan:
    # one cell per behaviour
    grid = [f"run.seed={','.join(str(i) for i in range(len(behaviours)))}"]
    plan = S.plan_sweep(
        QUICKSTART, tiny(tmp_path / "cache", tmp_path / "runs"), grid, name="stand_in"
    )
    for cell, behaviour in zip(plan.cells, behaviours):
        cell.command = [sys.executable, "-c", STAND_INS[behaviour], str(cell.run_dir)]
    return plan


@pytest.mark.parametrize("keep_going", [False, True])
def test_failures_stop_the_sweep_unless_keep_going(tmp_path, keep_going):
    plan = stand_in_plan(tmp_path, ["ok", "exit3", "killed", "ok"])
    with pytest.raises(S.SweepError) as e:
        S.run_sweep(plan, keep_going=keep_going, log=lambda m: None)
    cells = json.loads(plan.manifest_path.read_text())["cells"]
    if keep_going:
        assert [c["status"] for c in cells] == ["done", "failed", "failed", "done"]
        assert [c["exit_code"] for c in cells] == [0, 3, -9, 0]
        assert "2 of 4 cells failed" in str(e.value)
        assert "(killed by signal 9)" in str(e.value)
    else:
        assert [c["status"] for c in cells] == ["done", "failed", "pending", "pending"]
        assert "1 of 4 cells failed" in str(e.value) and "2 not run" in str(e.value)
    assert cells[1]["error"] == "error: stand-in failure"
    assert "(exit code 3)" in str(e.value)
