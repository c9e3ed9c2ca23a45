"""`distrib-gpt sweep`: run every cell of a grid of config values, one run per cell, in
order.

    distrib-gpt sweep --config configs/quickstart.yaml \\
        --grid precision=fp32,bf16 --grid lora.enabled=false,true \\
        [--nproc-per-node N] [--keep-going] [--dry-run] [overrides ...]

- **Grid.** `--grid KEY=V1,V2,...` with any dotted config key; each value is parsed as
  YAML, exactly like a `section.key=value` override (commas inside `[...]`, `{...}` or
  quotes do not split, so `--grid 'optim.betas=[0.9,0.95],[0.9,0.99]'` has two values).
  The cells are the cartesian product of the axes, the last `--grid` varying fastest.
  Every cell's config is loaded and validated before anything runs: a bad key or value
  fails the whole command with the key named, and nothing is started.
- **Layout.** The sweep directory is `<run.out_dir>/<sweep name>/` (`--name`, default
  `<run.name>-sweep`). It holds `sweep.json` (the manifest), `logs/<run name>.log` (each
  cell's output) and one run directory per cell, named
  `<run.name>-<key>=<value>[-<key>=<value>...]` with one `key=value` per grid axis, e.g.
  `quickstart-precision=bf16-lora.enabled=true`. Characters other than letters, digits
  and `._+=-` in a value become `_`; when that makes two cells' names equal, or a name
  longer than 120 characters, the cell's name ends in `-<8 hex digits>` (a hash of its
  exact overrides) instead.
- **Execution.** Cells run one after another, each in its own process (`python -m
  distrib_gpt.train`, or under `python -m torch.distributed.run --standalone
  --nproc-per-node N` with `--nproc-per-node N`), so a crash in one cell cannot take the
  sweep down. A failed cell is recorded with its exit code; without `--keep-going` the
  sweep stops there, with it the sweep goes on. Either way the command exits with an
  error naming the failed cells.
- **Resuming.** Running the same command again continues the sweep: a cell whose run
  directory has `summary.json` is skipped, a cell with a started run but no summary
  reruns with `resume=auto` (from its latest sharded checkpoint, or from the start if it
  has none). A run directory holding a run of a different config is refused before
  anything runs.
- **Manifest.** `sweep.json` (rewritten atomically after every change) lists the grid,
  and per cell: its settings, run name and directory, the exact command, action (`run`,
  `resume`, `skip`), status (`pending`, `running`, `done`, `skipped`, `failed`,
  `interrupted`), exit code, start/end times and log file (a skipped cell keeps those of
  the run that finished it).

`distrib-gpt report <sweep dir> --out DIR` (distrib_gpt/report.py) compares the cells'
runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from .config import Config, ConfigError, load_config

MANIFEST = "sweep.json"
MAX_NAME_LEN = 120
RESERVED_KEYS = {
    "run.name": "the sweep names each cell's run (use --name for the sweep's name)",
    "run.out_dir": "the sweep puts every run under <run.out_dir>/<sweep name>/ "
    "(set run.out_dir as an override)",
    "resume": "the sweep decides it per cell "
    "(finished cells are skipped, started ones resumed)",
}
# keys that say where a run lives or how it is displayed, not what it computes: a run
# directory may differ from its cell in these and still count as that cell's run
NON_RESULT_KEYS = (
    "run.name",
    "run.out_dir",
    "run.overwrite",
    "resume",
    "train.progress",
    "data.cache_dir",
)


class SweepError(ValueError):
    """A sweep cannot be planned (bad grid, bad cell config, foreign run directory)
    or some of its cells failed."""


# ------------------------------------------------------------------------------ grid


@dataclass(frozen=True)
class Axis:
    """One `--grid KEY=V1,V2` flag: a dotted config key and its raw value texts."""

    key: str
    values: tuple[str, ...]


def split_values(raw: str) -> list[str]:
    """Split `raw` at the commas that are not inside brackets, braces or quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_axis(spec: str) -> Axis:
    """`"precision=fp32,bf16"` -> Axis("precision", ("fp32", "bf16"))."""
    key, sep, raw = spec.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise SweepError(
            f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. --grid precision=fp32,bf16)"
        )
    if key in RESERVED_KEYS:
        raise SweepError(f"--grid {key}: cannot be a grid axis: {RESERVED_KEYS[key]}")
    values = split_values(raw)
    if any(v == "" for v in values):
        raise SweepError(f"--grid {key}: empty value in {raw!r}")
    for v in values:
        try:
            yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise SweepError(f"--grid {key}: cannot parse value {v!r}: {e}") from None
    if len(set(values)) != len(values):
        raise SweepError(f"--grid {key}: repeated value in {raw!r}")
    return Axis(key, tuple(values))


def parse_grid(specs: Sequence[str]) -> list[Axis]:
    """Every `--grid` flag as an Axis; at least one, each key at most once."""
    if not specs:
        raise SweepError(
            "--grid: give at least one axis, e.g. --grid precision=fp32,bf16"
        )
    axes = [parse_axis(s) for s in specs]
    seen: set[str] = set()
    for a in axes:
        if a.key in seen:
            raise SweepError(
                f"--grid {a.key}: given twice; list all its values in one flag"
            )
        seen.add(a.key)
    return axes


def grid_cells(axes: Sequence[Axis]) -> list[dict[str, str]]:
    """The cartesian product of the axes, as {key: raw value} in axis order (last
    axis fastest)."""
    return [
        dict(zip([a.key for a in axes], combo))
        for combo in itertools.product(*(a.values for a in axes))
    ]


# ---------------------------------------------------------------------------- naming


def slug(text: str) -> str:
    """A filesystem-safe rendering of a value: letters, digits and `._+=-`, others as
    `_`."""
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text) or "_"


def settings_hash(settings: dict[str, str]) -> str:
    """8 hex digits identifying a cell's exact overrides."""
    blob = "\n".join(f"{k}={v}" for k, v in settings.items()).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def cell_names(base: str, cells: Sequence[dict[str, str]]) -> list[str]:
    """Run names: `<base>-<key>=<value>-...`; a hash suffix replaces an ambiguous or
    too long one."""
    readable = [
        base + "".join(f"-{k}={slug(v)}" for k, v in cell.items()) for cell in cells
    ]
    counts = {n: readable.count(n) for n in readable}
    return [
        name
        if counts[name] == 1 and len(name) <= MAX_NAME_LEN
        else f"{name[: MAX_NAME_LEN - 9]}-{settings_hash(cell)}"
        for name, cell in zip(readable, cells)
    ]


# -------------------------------------------------------------------------- planning


@dataclass
class Cell:
    """One run of the sweep and what the sweep will do with it."""

    index: int
    settings: dict[str, str]
    name: str
    run_dir: Path
    overrides: list[str]
    action: str  # run | resume | skip
    command: list[str] = field(default_factory=list)


@dataclass
class SweepPlan:
    name: str
    dir: Path
    config: Optional[str]
    overrides: list[str]
    axes: list[Axis]
    cells: list[Cell]
    nproc_per_node: Optional[int] = None

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as {dotted key: leaf value}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and not key.startswith("data.columns"):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def result_config(cfg_dict: dict) -> dict[str, Any]:
    """The flattened config without the keys that do not change a run's results."""
    return {k: v for k, v in flatten(cfg_dict).items() if k not in NON_RESULT_KEYS}


def config_differences(a: dict, b: dict) -> list[str]:
    """`key: a vs b` for every result-relevant key where two config mappings differ."""
    fa, fb = result_config(a), result_config(b)
    return [
        f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}"
        for k in sorted(set(fa) | set(fb))
        if fa.get(k) != fb.get(k)
    ]


def cell_action(cfg: Config, label: str) -> str:
    """`skip` (finished), `resume` (started, unfinished) or `run` (nothing there
    yet); refuses a run directory that holds a different run."""
    run_dir = cfg.run_dir
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "run"
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise SweepError(
            f"cell {label}: {run_dir} holds files but no config.yaml (not a run of "
            "this sweep); remove it or use another --name"
        )
    try:
        on_disk = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SweepError(
            f"cell {label}: {saved} is not valid YAML ({e}); remove the run or use "
            "another --name"
        ) from None
    diffs = config_differences(cfg.to_dict(), on_disk)
    if diffs:
        raise SweepError(
            f"cell {label}: {run_dir} holds a run of a different config "
            f"({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}, this sweep "
            f"vs on disk); remove it "
            "or use another --name"
        )
    return "skip" if (run_dir / "summary.json").is_file() else "resume"


def describe(settings: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def plan_sweep(
    config: Optional[str],
    overrides: Sequence[str],
    grid: Sequence[str],
    name: Optional[str] = None,
    nproc_per_node: Optional[int] = None,
) -> SweepPlan:
    """Parse the grid, load and validate every cell's config, decide each cell's action.
    Raises SweepError (or ConfigError for the base config) before anything runs."""
    axes = parse_grid(grid)
    base = load_config(config, overrides)
    if nproc_per_node is not None and nproc_per_node < 1:
        raise SweepError(f"--nproc-per-node: must be >= 1, got {nproc_per_node}")
    sweep_name = name or f"{base.run.name}-sweep"
    if "/" in sweep_name or sweep_name in ("", ".", ".."):
        raise SweepError(f"--name: {sweep_name!r} must be a plain directory name")
    sweep_dir = Path(base.run.out_dir) / sweep_name
    settings = grid_cells(axes)
    # run.out_dir and run.name are folded into the sweep directory and the cells' names
    kept = [
        o
        for o in overrides
        if o.partition("=")[0].strip().lstrip("-") not in ("run.out_dir", "run.name")
    ]
    cells = []
    for i, (cell, run_name) in enumerate(
        zip(settings, cell_names(base.run.name, settings))
    ):
        cell_overrides = [
            *kept,
            *(f"{k}={v}" for k, v in cell.items()),
            f"run.out_dir={sweep_dir}",
            f"run.name={run_name}",
        ]
        try:
            cfg = load_config(config, cell_overrides)
        except ConfigError as e:
            raise SweepError(f"cell {describe(cell)}: {e}") from None
        if nproc_per_node and nproc_per_node > 1 and cfg.parallel.strategy == "single":
            raise SweepError(
                f"cell {describe(cell)}: parallel.strategy: 'single' cannot run under "
                f"--nproc-per-node {nproc_per_node}; "
                "add parallel.strategy=ddp (or zero1, fsdp_full, fsdp_grad_op, hsdp) "
                "as an override or a grid axis"
            )
        action = cell_action(cfg, describe(cell))
        if action == "resume":
            cell_overrides.append("resume=auto")
        cells.append(Cell(i, cell, run_name, cfg.run_dir, cell_overrides, action))
    plan = SweepPlan(
        sweep_name, sweep_dir, config, list(overrides), axes, cells, nproc_per_node
    )
    for c in cells:
        c.command = cell_command(plan, c)
    return plan


def cell_command(plan: SweepPlan, cell: Cell) -> list[str]:
    """The process a cell runs: the trainer, under torchrun when --nproc-per-node is
    given."""
    config = ["--config", plan.config] if plan.config else []
    if plan.nproc_per_node:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(plan.nproc_per_node),
        ]
    else:
        launcher = [sys.executable]
    return [*launcher, "-m", "distrib_gpt.train", *config, *cell.overrides]


# ------------------------------------------------------------------------- manifest


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_manifest(manifest: dict, path: Path) -> None:
    """Write sweep.json atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(sweep_dir: Path) -> dict:
    """The manifest of a sweep directory (SweepError if missing or unreadable)."""
    path = Path(sweep_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(
            f"{sweep_dir}: no {MANIFEST} (not a sweep directory)"
        ) from None
    except json.JSONDecodeError as e:
        raise SweepError(f"{path}: not valid JSON ({e})") from None


def new_manifest(plan: SweepPlan, keep_going: bool) -> dict:
    """The manifest of a planned sweep, every cell pending (or skipped when finished:
    then with the exit code, times and duration of the run that finished it, as the
    previous manifest recorded them)."""
    manifest = {
        "sweep": plan.name,
        "dir": str(plan.dir),
        "config": plan.config,
        "overrides": plan.overrides,
        "grid": {a.key: list(a.values) for a in plan.axes},
        "nproc_per_node": plan.nproc_per_node,
        "keep_going": keep_going,
        "command": shlex.join(["distrib-gpt", "sweep", *sweep_argv(plan, keep_going)]),
        "status": "running",
        "started_at": now_iso(),
        "finished_at": None,
        "cells": [
            {
                "index": c.index,
                "settings": c.settings,
                "name": c.name,
                "run_dir": str(c.run_dir),
                "command": shlex.join(c.command),
                "action": c.action,
                "status": "skipped" if c.action == "skip" else "pending",
                "exit_code": None,
                "started_at": None,
                "finished_at": None,
                "duration_s": None,
                "log": str(plan.dir / "logs" / f"{c.name}.log"),
            }
            for c in plan.cells
        ],
    }
    previous = previous_records(plan.manifest_path)
    for record in manifest["cells"]:
        earlier = previous.get(record["name"], {})
        if record["action"] == "skip" and earlier.get("exit_code") == 0:
            for key in ("exit_code", "started_at", "finished_at", "duration_s"):
                record[key] = earlier.get(key)
    return manifest


def previous_records(path: Path) -> dict[str, dict]:
    """The cell records of an earlier manifest at `path`, by run name ({} if none)."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError, AttributeError):
        return {}
    return {c["name"]: c for c in cells if isinstance(c, dict) and "name" in c}


def sweep_argv(plan: SweepPlan, keep_going: bool) -> list[str]:
    """The `distrib-gpt sweep` arguments that reproduce this plan."""
    argv = ["--config", plan.config] if plan.config else []
    for a in plan.axes:
        argv += ["--grid", f"{a.key}={','.join(a.values)}"]
    argv += ["--name", plan.name]
    if plan.nproc_per_node:
        argv += ["--nproc-per-node", str(plan.nproc_per_node)]
    if keep_going:
        argv.append("--keep-going")
    return argv + plan.overrides


# ------------------------------------------------------------------------- execution


def run_logged(command: list[str], log_path: Path) -> int:
    """Run `command`, copying its output (stdout and stderr together) to our stdout
    and to `log_path`; returns its exit code (negative: killed by that signal)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = getattr(sys.stdout, "buffer", None)
    with (
        open(log_path, "ab") as log,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as proc,
    ):
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            log.write(chunk)
            log.flush()
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stdout.write(chunk.decode(errors="replace"))
        return proc.wait()


def last_error_line(log_path: Path) -> str:
    """The cell's `error: ...` line, else its last non-empty output line."""
    try:
        lines = [
            x.strip()
            for x in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            if x.strip()
        ]
    except OSError:
        return ""
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or [""])[-1]


def exit_description(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def run_cell(record: dict, cell: Cell) -> None:
    """Run one cell, filling in its manifest record (status, exit code, times)."""
    record.update(
        status="running",
        started_at=now_iso(),
        exit_code=None,
        finished_at=None,
        duration_s=None,
    )
    start = time.perf_counter()
    try:
        code = run_logged(cell.command, Path(record["log"]))
    except KeyboardInterrupt:
        record.update(
            status="interrupted",
            finished_at=now_iso(),
            duration_s=time.perf_counter() - start,
        )
        raise
    finished = code == 0 and (cell.run_dir / "summary.json").is_file()
    record.update(
        status="done" if finished else "failed",
        exit_code=code,
        finished_at=now_iso(),
        duration_s=time.perf_counter() - start,
    )
    if code == 0 and not finished:
        record["error"] = "the command succeeded but wrote no summary.json"
    elif code != 0:
        record["error"] = last_error_line(Path(record["log"]))


def say(message: str) -> None:
    """Print and flush, so our lines and the cells' output (copied as bytes) stay in
    order."""
    print(message, flush=True)


def run_sweep(
    plan: SweepPlan, keep_going: bool = False, log: Callable[[str], None] = say
) -> dict:
    """Run the plan's cells in order, recording each in sweep.json; returns the
    manifest. Raises SweepError at the end if any cell failed."""
    manifest = new_manifest(plan, keep_going)
    path = plan.manifest_path
    write_manifest(manifest, path)
    log(f"sweep {plan.name}: {len(plan.cells)} cells in {plan.dir} (manifest {path})")
    try:
        for cell, record in zip(plan.cells, manifest["cells"]):
            head = f"[{cell.index + 1}/{len(plan.cells)}] {describe(cell.settings)}"
            if cell.action == "skip":
                log(f"{head}: skipped, {cell.run_dir / 'summary.json'} exists")
                continue
            verb = "resuming" if cell.action == "resume" else "running"
            log(f"{head}: {verb}\n  $ {shlex.join(cell.command)}")
            run_cell(record, cell)
            write_manifest(manifest, path)
            if record["status"] == "failed":
                log(
                    f"{head}: FAILED ({exit_description(record['exit_code'])}): "
                    f"{record.get('error', '')} (log {record['log']})"
                )
                if not keep_going:
                    break
            else:
                log(f"{head}: done in {record['duration_s']:.1f}s")
    except KeyboardInterrupt:
        manifest.update(status="interrupted", finished_at=now_iso())
        write_manifest(manifest, path)
        raise
    failed = [r for r in manifest["cells"] if r["status"] == "failed"]
    not_run = [r for r in manifest["cells"] if r["status"] == "pending"]
    manifest.update(status="failed" if failed else "done", finished_at=now_iso())
    write_manifest(manifest, path)
    log(summary_line(manifest))
    if failed:
        names = ", ".join(
            f"{describe(r['settings'])} ({exit_description(r['exit_code'])})"
            for r in failed
        )
        rest = (
            f"; {len(not_run)} not run (stopped at the first failure; --keep-going "
            "runs them)"
            if not_run
            else ""
        )
        raise SweepError(
            f"sweep {plan.name}: {len(failed)} of {len(plan.cells)} cells failed: "
            f"{names}{rest}; see {path}"
        )
    return manifest


def summary_line(manifest: dict) -> str:
    counts: dict[str, int] = {}
    for r in manifest["cells"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return (
        f"sweep {manifest['sweep']}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f" | {manifest['dir']}"
    )


def print_plan(plan: SweepPlan, log: Callable[[str], None] = say) -> None:
    """What a `--dry-run` shows: each cell's action and resolved command."""
    log(
        f"sweep {plan.name}: {len(plan.cells)} cells in {plan.dir} (dry run: nothing "
        "is started)"
    )
    for c in plan.cells:
        log(
            f"[{c.index + 1}/{len(plan.cells)}] {describe(c.settings)}: {c.action}\n  "
            f"$ {shlex.join(c.command)}"
        )


def sweep_command(args: Any) -> Optional[dict]:
    """`distrib-gpt sweep` (see the module docstring)."""
    plan = plan_sweep(
        args.config,
        args.overrides,
        args.grid,
        name=args.name,
        nproc_per_node=args.nproc_per_node,
    )
    if args.dry_run:
        print_plan(plan)
        return None
    return run_sweep(plan, keep_going=args.keep_going)
