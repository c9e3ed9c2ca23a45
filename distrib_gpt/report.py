"""`distrib-gpt report`: compare finished runs in one Markdown report with PNG plots.

    distrib-gpt report runs/quickstart-sweep --out reports/quickstart
    distrib-gpt report runs/a runs/b runs/c --out reports/abc [--allow-mixed]

Inputs are run directories (`summary.json`, `config.yaml`, `metrics.jsonl`, and where it
exists `quant_summary.json` or `checkpoint_int8/quant_summary.json`) or sweep
directories (`sweep.json`, distrib_gpt/sweep.py), which stand for their cells' finished
runs. `--out` receives, all at once (built in a temporary directory, then renamed into
place):

- `report.md`: runs, the seed's results table, validation loss, ratios against fp32,
  figures, the ablation grid, int8 results and a method section generated from the
  resolved configs;
- `report.json`: the exact value behind every table cell (summary.json's, unrounded), so
  the Markdown, which shows them through `fmt`, can be checked against the runs;
- `loss_curves.png`, `throughput.png`, `memory.png`.

Comparison rules: the runs must share their data (summary `data_manifest_key`) and model
(parameter count and the shape keys of `model.*`); otherwise the command refuses with
one line naming the runs, or with `--allow-mixed` reports them with a warning and a ⚠ on
each run that differs from the data and model most runs share. Ratios use, for each run,
the fp32 run whose other settings match it best (the table names it); without an fp32
run there are no ratios. A value a run does not have (GPU memory on a CPU, MFU without a
known peak FLOP/s) shows as `n/a` with a footnote saying why, never as 0. docs/report.md
explains every table and plot.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from .config import Config
from .sweep import MANIFEST, NON_RESULT_KEYS, SweepError, flatten, read_manifest

# distrib_gpt.quantize.QUANT_SUMMARY, not imported from there: that module loads torch
QUANT_SUMMARY = "quant_summary.json"
MiB = 2**20
MODEL_KEYS = (
    "model.name",
    "model.init",
    "model.pretrained_path",
    "model.n_layer",
    "model.n_head",
    "model.n_embd",
    "model.block_size",
    "model.pad_vocab_to",
)
ABLATION_KEYS = (
    "precision",
    "train.grad_accum",
    "parallel.activation_checkpointing",
    "lora.enabled",
)
FSDP_STRATEGIES = ("fsdp_full", "fsdp_grad_op", "hsdp")
FIGURES = ("loss_curves.png", "throughput.png", "memory.png")


class ReportError(ValueError):
    """Runs cannot be reported (missing files, incomparable runs, bad output
    directory)."""


# ------------------------------------------------------------------------ formatting


def sig3(x: float) -> str:
    """`x` to 3 significant figures, without exponent, thousands separated: 12,300 /
    5.68 / 0.0123."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    digits = 2 - math.floor(math.log10(abs(x)))
    rounded = round(x, digits)
    # rounding may gain a digit (9.996 -> 10.0): count the digits of the rounded value
    digits = 2 - math.floor(math.log10(abs(rounded)))
    rounded = round(x, digits)
    return f"{rounded:,.{max(digits, 0)}f}"


def fmt(value: Any, kind: str) -> str:
    """How report.md shows a value of `kind`; None is "n/a". Kinds: text, int, bytes
    (as MiB), seconds, ms, rate, loss (4 decimals), delta (signed, 3 significant
    figures), percent (of a fraction), ratio (3 significant figures and x), bool
    (on/off)."""
    if value is None:
        return "n/a"
    if kind == "text":
        return str(value)
    if kind == "bool":
        return "on" if value else "off"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "bytes":
        return sig3(value / MiB)
    if kind in ("seconds", "ms", "rate"):
        return sig3(value)
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "delta":
        return "0" if value == 0 else f"{value:+.3g}"
    if kind == "percent":
        return sig3(value * 100) + "%"
    if kind == "ratio":
        return sig3(value) + "x"
    raise ValueError(f"unknown kind {kind!r}")


def show(value: Any) -> str:
    """A config value as it is written in YAML overrides: true, null, [0.9, 0.95]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One finished run directory, read."""

    dir: Path
    summary: dict
    # the resolved config, flattened; defaults fill in keys that older runs lack
    config: dict
    metrics: list[dict]
    quant: Optional[dict] = None
    quant_path: Optional[Path] = None
    label: str = ""
    flagged: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.dir.name

    def get(self, key: str) -> Any:
        return self.summary.get(key)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path.parent}: no {path.name} ({what})") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records ([] when the file is missing)."""
    if not path.is_file():
        return []
    return [
        json.loads(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def find_quant_summary(run_dir: Path) -> Optional[Path]:
    """quant_summary.json of the run: the end-of-training hook's, else the default
    `--out` of `distrib-gpt quantize --checkpoint RUN/checkpoint --out
    RUN/checkpoint_int8`."""
    for path in (run_dir / QUANT_SUMMARY, run_dir / "checkpoint_int8" / QUANT_SUMMARY):
        if path.is_file():
            return path
    return None


def load_run(run_dir: Path) -> Run:
    """Read a finished run directory (ReportError when it is not one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    summary = read_json(run_dir / "summary.json", "not a finished run")
    try:
        raw = (
            yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        )
    except FileNotFoundError:
        raise ReportError(f"{run_dir}: no config.yaml (not a run directory)") from None
    except yaml.YAMLError as e:
        raise ReportError(f"{run_dir / 'config.yaml'}: invalid YAML ({e})") from None
    config = {**flatten(Config().to_dict()), **flatten(raw)}
    quant_path = find_quant_summary(run_dir)
    quant = read_json(quant_path, "int8 results") if quant_path else None
    return Run(
        run_dir,
        summary,
        config,
        read_metrics(run_dir / "metrics.jsonl"),
        quant,
        quant_path,
    )


def expand_inputs(
    paths: Sequence[str | Path],
) -> tuple[list[Path], list[dict], list[str]]:
    """Run directories from the arguments (a sweep directory stands for its cells'
    finished runs), the sweep manifests met, and warnings about cells without a
    finished run."""
    run_dirs: list[Path] = []
    manifests: list[dict] = []
    warnings: list[str] = []
    for p in map(Path, paths):
        if (p / MANIFEST).is_file() and not (p / "summary.json").is_file():
            try:
                manifest = read_manifest(p)
            except SweepError as e:
                raise ReportError(str(e)) from None
            manifests.append(manifest)
            for cell in manifest.get("cells", []):
                # cells live right under the sweep directory, wherever it moved since
                cell_dir = p / cell["name"]
                if (cell_dir / "summary.json").is_file():
                    run_dirs.append(cell_dir)
                else:
                    warnings.append(
                        f"sweep {manifest.get('sweep', p.name)}: cell {cell['name']} "
                        f"has no finished run (status {cell.get('status')}); left out"
                    )
        else:
            run_dirs.append(p)
    unique = list(dict.fromkeys(d.resolve() for d in run_dirs))
    if not unique:
        raise ReportError(
            "no finished runs to report ("
            + "; ".join(warnings or ["no run directories given"])
            + ")"
        )
    return unique, manifests, warnings


# ------------------------------------------------------------------ comparability


def identity(run: Run) -> dict[str, Any]:
    """What must be equal for two runs to be compared: data and model."""
    return {
        "data (data_manifest_key)": run.get("data_manifest_key"),
        "model parameters": run.get("params"),
        **{k: run.config.get(k) for k in MODEL_KEYS},
    }


def check_comparable(runs: Sequence[Run], allow_mixed: bool) -> list[str]:
    """Refuse (ReportError) runs of different data or model, or with allow_mixed flag
    each run that differs from the most common data and model; returns the
    differences, one line each."""
    problems = []
    for key in identity(runs[0]):
        groups: dict[str, list[str]] = {}
        for r in runs:
            groups.setdefault(show(identity(r)[key]), []).append(r.name)
        if len(groups) > 1:
            problems.append(
                f"{key}: "
                + "; ".join(f"{v} ({', '.join(names)})" for v, names in groups.items())
            )
    if problems and not allow_mixed:
        raise ReportError(
            "runs differ in "
            + " | ".join(problems)
            + " -- a report compares runs of the same data and model; "
            "pass --allow-mixed to report them anyway, flagged"
        )
    ids = [json.dumps(identity(r), sort_keys=True, default=str) for r in runs]
    ref = identity(runs[ids.index(max(ids, key=ids.count))])  # the most common
    for r in runs:
        r.flagged = [k for k, v in identity(r).items() if v != ref[k]]
    return problems


def varied_keys(runs: Sequence[Run], first: Sequence[str] = ()) -> list[str]:
    """Config keys whose values differ between the runs (where a run lives excluded):
    the keys in `first` (a sweep's grid axes) in their order, then the ablation keys,
    then the rest in config order."""
    keys = list(
        dict.fromkeys([*first, *ABLATION_KEYS, *(k for r in runs for k in r.config)])
    )
    return [
        k
        for k in keys
        if k not in NON_RESULT_KEYS and len({show(r.config.get(k)) for r in runs}) > 1
    ]


def assign_labels(runs: Sequence[Run], varied: Sequence[str]) -> None:
    """Short row labels: the resolved precision, then `key=value` for the other
    varied keys; ⚠ on runs flagged by --allow-mixed; the directory name where labels
    would repeat."""
    for r in runs:
        parts = [str(r.get("precision"))] + [
            f"{k}={show(r.config.get(k))}" for k in varied if k != "precision"
        ]
        r.label = " ".join(parts) + (" ⚠" if r.flagged else "")
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.name})"


def settings_differences(a: Run, b: Run, ignore: Sequence[str] = ()) -> list[str]:
    """Config keys (results-relevant) where two runs differ, plus their data."""
    keys = set(a.config) | set(b.config)
    diffs = [
        k
        for k in sorted(keys)
        if k not in NON_RESULT_KEYS
        and k not in ignore
        and a.config.get(k) != b.config.get(k)
    ]
    if a.get("data_manifest_key") != b.get("data_manifest_key"):
        diffs.append("data")
    return diffs


def pick_baselines(runs: Sequence[Run]) -> dict[str, Optional[Run]]:
    """For each run (by label), the fp32 run that differs from it in the fewest other
    settings (the first such run on ties); None without fp32 runs."""
    fp32 = [r for r in runs if r.get("precision") == "fp32"]
    out: dict[str, Optional[Run]] = {}
    for r in runs:
        out[r.label] = (
            min(
                fp32,
                key=lambda b: len(settings_differences(r, b, ignore=("precision",))),
            )
            if fp32
            else None
        )
    return out


# ---------------------------------------------------------------------------- tables


@dataclass
class Column:
    key: str
    header: str
    kind: str


@dataclass
class Table:
    """Rows of raw values (report.json) shown through `fmt` (report.md).
    `reasons[i][key]` says why row i has no value for `key` (a footnote on its n/a)."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[dict[str, str]] = field(default_factory=list)

    def add(
        self, values: dict[str, Any], reasons: Optional[dict[str, str]] = None
    ) -> None:
        self.rows.append(values)
        self.reasons.append(
            {k: v for k, v in (reasons or {}).items() if values.get(k) is None}
        )

    def to_json(self) -> dict:
        return {
            "title": self.title,
            "columns": [vars(c) for c in self.columns],
            "rows": self.rows,
        }


class Footnotes:
    """Numbered footnotes, one per distinct text, in order of first use."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[^{self.texts.index(text) + 1}]"

    def render(self) -> str:
        return "\n".join(f"[^{i}]: {t}" for i, t in enumerate(self.texts, 1))


def cell_text(value: Any, kind: str, reason: Optional[str], notes: Footnotes) -> str:
    text = fmt(value, kind)
    if value is None and reason:
        text += notes.mark(reason)
    return text.replace("|", "\\|")


def render_table(table: Table, notes: Footnotes) -> str:
    """The table as GitHub Markdown (numbers right-aligned)."""
    head = "| " + " | ".join(c.header for c in table.columns) + " |"
    align = (
        "| "
        + " | ".join(
            "---" if c.kind in ("text", "bool") else "---:" for c in table.columns
        )
        + " |"
    )
    body = [
        "| "
        + " | ".join(
            cell_text(row.get(c.key), c.kind, reasons.get(c.key), notes)
            for c in table.columns
        )
        + " |"
        for row, reasons in zip(table.rows, table.reasons)
    ]
    return "\n".join([head, align, *body])


def na_reason(run: Run, key: str) -> Optional[str]:
    """Why a summary value is missing from a run."""
    if key in ("peak_gpu_mem_bytes", "peak_gpu_reserved_bytes"):
        if run.get("device") == "cpu":
            return (
                "CPU run: no GPU memory to measure (the host RSS column is its memory "
                "figure)"
            )
        return "not recorded by this run"
    if key in ("mfu", "mfu_peak_source"):
        return (
            "not recorded: runs before MFU had a measured peak on CPUs and unknown GPUs "
            "(docs/training.md, FLOPs and MFU)"
        )
    if key == "tokens_per_s":
        return "no timed steps: the first optimizer step is warm-up and not timed"
    if key == "checkpoint_bytes":
        return "no consolidated checkpoint (checkpoint.save_final=false)"
    if key == "adapter_bytes":
        return "not a LoRA run: no adapter file"
    return "not recorded by this run"


def epochs_shown(runs: Sequence[Run]) -> int:
    """Loss columns go from epoch 0 to the largest number of completed epochs."""
    return max(len(r.get("train_loss_by_epoch") or [None]) for r in runs) - 1


def epochs_reason(run: Run, key: str) -> str:
    return f"the run completed {len(run.get(key) or []) - 1} epochs"


def loss_after(run: Run, key: str, epoch: int) -> Optional[float]:
    losses = run.get(key) or []
    return losses[epoch] if epoch < len(losses) else None


def runs_table(runs: Sequence[Run], varied: Sequence[str]) -> Table:
    shown = [
        k for k in varied if k != "precision"
    ]  # the resolved precision has its own column
    cols = [Column("run", "run", "text"), Column("dir", "directory", "text")]
    cols += [Column(k, k, "text") for k in shown]
    cols += [
        Column("precision", "precision", "text"),
        Column("strategy", "strategy", "text"),
        Column("world_size", "processes", "int"),
        Column("device_name", "device", "text"),
        Column("steps", "steps", "int"),
        Column("epochs_completed", "epochs", "int"),
        Column("trainable_params", "trainable params", "int"),
    ]
    t = Table("runs", "Runs", cols)
    for r in runs:
        t.add(
            {
                "run": r.label,
                "dir": r.name,
                **{k: show(r.config.get(k)) for k in shown},
                **{c.key: r.get(c.key) for c in cols[2 + len(shown) :]},
            }
        )
    return t


def results_table(runs: Sequence[Run]) -> Table:
    """The seed's table: throughput, epoch time, memory, checkpoint size, loss by
    epoch, MFU, padding."""
    n = epochs_shown(runs)
    cols = [
        Column("run", "run", "text"),
        Column("tokens_per_s", "tokens/s", "rate"),
        Column("mean_epoch_time_s", "mean epoch time (s)", "seconds"),
        Column("peak_gpu_mem_bytes", "peak GPU memory (MiB)", "bytes"),
        Column("peak_host_rss_bytes", "peak host RSS (MiB)", "bytes"),
        Column("checkpoint_bytes", "checkpoint size (MiB)", "bytes"),
        *[
            Column(f"train_loss_epoch_{e}", f"train loss after epoch {e}", "loss")
            for e in range(n + 1)
        ],
        Column("mfu", "MFU", "percent"),
        Column("mfu_peak_source", "MFU peak", "text"),
        Column("padding_fraction", "padding fraction", "percent"),
    ]
    t = Table("results", "Results", cols)
    for r in runs:
        values = {
            "run": r.label,
            **{c.key: r.get(c.key) for c in cols[1:6]},
            "mfu": r.get("mfu"),
            # "spec": the GPU's data-sheet peak; "measured": a matmul calibration (CPUs)
            "mfu_peak_source": r.get("mfu_peak_source"),
            "padding_fraction": r.get("padding_fraction"),
        }
        values.update(
            {
                f"train_loss_epoch_{e}": loss_after(r, "train_loss_by_epoch", e)
                for e in range(n + 1)
            }
        )
        reasons = {c.key: na_reason(r, c.key) for c in cols}
        reasons.update(
            {
                f"train_loss_epoch_{e}": epochs_reason(r, "train_loss_by_epoch")
                for e in range(n + 1)
            }
        )
        t.add(values, reasons)
    return t


def val_loss_table(runs: Sequence[Run]) -> Table:
    n = epochs_shown(runs)
    cols = [Column("run", "run", "text")] + [
        Column(f"val_loss_epoch_{e}", f"val loss after epoch {e}", "loss")
        for e in range(n + 1)
    ]
    t = Table("val_loss", "Validation loss", cols)
    for r in runs:
        t.add(
            {
                "run": r.label,
                **{
                    f"val_loss_epoch_{e}": loss_after(r, "val_loss_by_epoch", e)
                    for e in range(n + 1)
                },
            },
            {
                f"val_loss_epoch_{e}": epochs_reason(r, "val_loss_by_epoch")
                for e in range(n + 1)
            },
        )
    return t


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def ratios_table(runs: Sequence[Run], baselines: dict[str, Optional[Run]]) -> Table:
    """Speedups and memory ratios of each run against its fp32 baseline."""
    cols = [
        Column("run", "run", "text"),
        Column("baseline", "fp32 baseline", "text"),
        Column("tokens_per_s_speedup", "tokens/s speedup", "ratio"),
        Column("epoch_time_speedup", "epoch time speedup", "ratio"),
        Column("peak_gpu_mem_ratio", "peak GPU memory ratio", "ratio"),
        Column("peak_host_rss_ratio", "peak host RSS ratio", "ratio"),
        Column("checkpoint_ratio", "checkpoint size ratio", "ratio"),
        Column("final_train_loss_delta", "final train loss - baseline's", "delta"),
    ]
    t = Table("vs_fp32", "Against fp32", cols)
    missing = "missing in this run or in its fp32 baseline"
    for r in runs:
        b = baselines[r.label]
        if b is None:
            continue
        same_epochs = r.get("epochs_completed") == b.get("epochs_completed")
        values = {
            "run": r.label,
            "baseline": b.label,
            "tokens_per_s_speedup": ratio(r.get("tokens_per_s"), b.get("tokens_per_s")),
            "epoch_time_speedup": ratio(
                b.get("mean_epoch_time_s"), r.get("mean_epoch_time_s")
            ),
            "peak_gpu_mem_ratio": ratio(
                r.get("peak_gpu_mem_bytes"), b.get("peak_gpu_mem_bytes")
            ),
            "peak_host_rss_ratio": ratio(
                r.get("peak_host_rss_bytes"), b.get("peak_host_rss_bytes")
            ),
            "checkpoint_ratio": ratio(
                r.get("checkpoint_bytes"), b.get("checkpoint_bytes")
            ),
            "final_train_loss_delta": r.get("train_loss_by_epoch")[-1]
            - b.get("train_loss_by_epoch")[-1]
            if same_epochs
            else None,
        }
        reasons = {c.key: missing for c in cols}
        reasons["peak_gpu_mem_ratio"] = (
            na_reason(r, "peak_gpu_mem_bytes")
            if r.get("peak_gpu_mem_bytes") is None
            else missing
        )
        reasons["final_train_loss_delta"] = (
            "the run and its baseline completed different numbers of epochs"
        )
        t.add(values, reasons)
    return t


def peak_memory(run: Run) -> tuple[Optional[int], str]:
    """The memory figure of a cell: the CUDA allocator's peak on a GPU, else the host
    RSS."""
    if run.get("device") == "cuda" and run.get("peak_gpu_mem_bytes") is not None:
        return run.get("peak_gpu_mem_bytes"), "GPU peak allocated"
    return run.get("peak_host_rss_bytes"), "host peak RSS (CPU run)" if run.get(
        "device"
    ) == "cpu" else "host peak RSS"


def ablation_table(runs: Sequence[Run], varied: Sequence[str]) -> Table:
    """One row per run over precision x grad accumulation x activation checkpointing
    x LoRA (and any other varied key): memory and time."""
    extra = [k for k in varied if k not in ABLATION_KEYS]
    cols = [
        Column("run", "run", "text"),
        Column("precision", "precision", "text"),
        Column("train.grad_accum", "grad accum", "int"),
        Column("parallel.activation_checkpointing", "activation checkpointing", "bool"),
        Column("lora.enabled", "LoRA", "bool"),
        *[Column(k, k, "text") for k in extra],
        Column("trainable_params", "trainable params", "int"),
        Column("peak_memory_bytes", "peak memory (MiB)", "bytes"),
        Column("peak_memory_kind", "memory measured", "text"),
        Column("mean_epoch_time_s", "mean epoch time (s)", "seconds"),
        Column("tokens_per_s", "tokens/s", "rate"),
        Column("adapter_bytes", "LoRA adapter (MiB)", "bytes"),
    ]
    t = Table("ablation", "Ablation grid", cols)
    for r in runs:
        mem, kind = peak_memory(r)
        t.add(
            {
                "run": r.label,
                "precision": r.get("precision"),
                "train.grad_accum": r.config.get("train.grad_accum"),
                "parallel.activation_checkpointing": r.config.get(
                    "parallel.activation_checkpointing"
                ),
                "lora.enabled": r.config.get("lora.enabled"),
                **{k: show(r.config.get(k)) for k in extra},
                "trainable_params": r.get("trainable_params"),
                "peak_memory_bytes": mem,
                "peak_memory_kind": kind,
                "mean_epoch_time_s": r.get("mean_epoch_time_s"),
                "tokens_per_s": r.get("tokens_per_s"),
                "adapter_bytes": r.get("adapter_bytes"),
            },
            {
                k: na_reason(r, k)
                for k in ("tokens_per_s", "adapter_bytes", "peak_memory_bytes")
            },
        )
    return t


def int8_table(runs: Sequence[Run]) -> Optional[Table]:
    """int8 results of the runs that have a quant_summary.json (None when none has)."""
    quantized = [r for r in runs if r.quant]
    if not quantized:
        return None
    batches = sorted(
        {
            k
            for r in quantized
            for k in (
                (r.quant.get("inference") or {})
                .get("fp32", {})
                .get("decode_tokens_per_s")
                or {}
            )
        },
        key=int,
    )
    cols = [
        Column("run", "run", "text"),
        Column("method", "method", "text"),
        Column("loss_fp32", "val loss fp32", "loss"),
        Column("loss_int8", "val loss int8", "loss"),
        Column("rel_loss_delta", "relative loss change", "percent"),
        Column("gate", "quality gate", "text"),
        Column("file_fp32", "file fp32 (MiB)", "bytes"),
        Column("file_int8", "file int8 (MiB)", "bytes"),
        Column("file_ratio", "size ratio", "ratio"),
        Column("prefill_ms_fp32", "prefill fp32 (ms)", "ms"),
        Column("prefill_ms_int8", "prefill int8 (ms)", "ms"),
        *[
            c
            for b in batches
            for c in (
                Column(f"decode_fp32_b{b}", f"decode tokens/s fp32, batch {b}", "rate"),
                Column(f"decode_int8_b{b}", f"decode tokens/s int8, batch {b}", "rate"),
            )
        ],
        Column("peak_rss_fp32", "peak RSS fp32 (MiB)", "bytes"),
        Column("peak_rss_int8", "peak RSS int8 (MiB)", "bytes"),
    ]
    t = Table("int8", "int8 inference", cols)
    for r in quantized:
        q = r.quant
        val, files, gate = (
            q.get("val") or {},
            q.get("file_bytes") or {},
            q.get("gate") or {},
        )
        inf = q.get("inference") or {}
        fp, i8 = inf.get("fp32") or {}, inf.get("int8") or {}
        values = {
            "run": r.label,
            "method": q.get("method"),
            "loss_fp32": val.get("loss_fp32"),
            "loss_int8": val.get("loss_int8"),
            "rel_loss_delta": val.get("rel_loss_delta"),
            "gate": None
            if gate.get("passed") is None
            else ("passed" if gate["passed"] else "FAILED")
            + (
                f" (max {fmt(gate['rel_loss_max'], 'percent')})"
                if gate.get("rel_loss_max") is not None
                else " (no gate)"
            ),
            "file_fp32": files.get("fp32"),
            "file_int8": files.get("int8"),
            "file_ratio": files.get("ratio"),
            "prefill_ms_fp32": fp.get("prefill_ms_batch1"),
            "prefill_ms_int8": i8.get("prefill_ms_batch1"),
            "peak_rss_fp32": fp.get("peak_rss_bytes"),
            "peak_rss_int8": i8.get("peak_rss_bytes"),
        }
        for b in batches:
            values[f"decode_fp32_b{b}"] = (fp.get("decode_tokens_per_s") or {}).get(b)
            values[f"decode_int8_b{b}"] = (i8.get("decode_tokens_per_s") or {}).get(b)
        reason = (
            "not measured (distrib-gpt quantize --no-measure, or "
            "quantize.measure=false)"
            if not inf
            else "not in this quant_summary.json"
        )
        t.add(values, {c.key: reason for c in cols})
    return t


# ------------------------------------------------------------------------ figures


def _figure(width: float, height: float, ncols: int):
    """A figure drawn by matplotlib's Agg renderer (no display, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_loss_curves(runs: Sequence[Run], path: Path) -> None:
    """Left: the logged training loss per optimizer step (metrics.jsonl). Right: the
    train (solid) and validation (dashed) loss after each epoch (summary.json)."""
    fig, (ax_step, ax_epoch) = _figure(12, 4.5, 2)
    markers = "osD^vP*X"
    for i, (r, color) in enumerate(zip(runs, _colors(len(runs)))):
        # runs that computed the same losses overlap: distinct markers, shrinking, keep
        # them visible
        style = dict(
            color=color,
            marker=markers[i % len(markers)],
            markersize=max(9 - i, 3),
            alpha=0.85,
        )
        points = [
            (m["step"], m["loss"]) for m in r.metrics if m.get("loss") is not None
        ]
        if points:
            ax_step.plot(*zip(*points), label=r.label, **style)
        train, val = (
            r.get("train_loss_by_epoch") or [],
            r.get("val_loss_by_epoch") or [],
        )
        ax_epoch.plot(range(len(train)), train, "-", label=r.label, **style)
        ax_epoch.plot(range(len(val)), val, "--", **style)
    ax_step.set(
        title="training loss per logged step (metrics.jsonl)",
        xlabel="optimizer step",
        ylabel="mean token loss",
    )
    ax_epoch.set(
        title="loss after each epoch (solid: train subset, dashed: validation)",
        xlabel="epoch",
        ylabel="mean token loss",
    )
    ax_epoch.xaxis.get_major_locator().set_params(integer=True)
    ax_step.legend(fontsize=7)
    ax_epoch.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def _bars(
    ax,
    runs: Sequence[Run],
    values: Sequence[Optional[float]],
    title: str,
    ylabel: str,
    kind: str,
) -> None:
    """One bar per run, labelled with its value as report.md shows it; n/a where
    missing."""
    x = range(len(runs))
    heights = [v if v is not None else 0 for v in values]
    bars = ax.bar(x, heights, color=_colors(len(runs)))
    for bar, v in zip(bars, values):
        ax.annotate(
            fmt(v, kind),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), [r.label for r in runs], rotation=20, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel)


def plot_throughput(runs: Sequence[Run], path: Path) -> None:
    fig, (left, right) = _figure(max(8, 2.2 * len(runs)), 4.5, 2)
    _bars(
        left,
        runs,
        [r.get("tokens_per_s") for r in runs],
        "training throughput",
        "tokens/s",
        "rate",
    )
    _bars(
        right,
        runs,
        [r.get("mean_epoch_time_s") for r in runs],
        "mean epoch time (training steps only)",
        "seconds",
        "seconds",
    )
    fig.savefig(path, dpi=100)


def plot_memory(runs: Sequence[Run], path: Path) -> None:
    fig, (left, right) = _figure(max(8, 2.2 * len(runs)), 4.5, 2)
    mems = [peak_memory(r) for r in runs]
    kinds = sorted({k for _, k in mems})
    _bars(
        left,
        runs,
        [m / MiB if m is not None else None for m, _ in mems],
        "peak memory: " + " / ".join(kinds),
        "MiB",
        "rate",
    )
    ckpt = [r.get("checkpoint_bytes") for r in runs]
    _bars(
        right,
        runs,
        [c / MiB if c is not None else None for c in ckpt],
        "checkpoint size on disk",
        "MiB",
        "rate",
    )
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------- text


PRECISION_MECHANICS = {
    "fp32": "**fp32**: weights, activations, gradients and optimizer states in fp32, "
    "no autocast. On CUDA, TF32 is switched off for matmuls and cuDNN "
    "(`torch.backends.cuda.matmul.allow_tf32 = False`, "
    "`torch.backends.cudnn.allow_tf32 = False`), so this is the full-precision "
    "baseline.",
    "tf32": "**tf32**: fp32 storage and no autocast; on CUDA GPUs of compute "
    "capability 8.0 or newer, fp32 matmuls and convolutions run on TF32 tensor cores "
    "(inputs rounded to a 10-bit mantissa, fp32 accumulation), switched on with "
    "`torch.backends.cuda.matmul.allow_tf32 = True` and "
    "`torch.backends.cudnn.allow_tf32 = True`. On a CPU it has no effect: the run "
    "computes in fp32, and its summary's `precision_note` says so.",
    "fp16": "**fp16**: the forward pass runs under "
    "`torch.autocast(dtype=torch.float16)`: matmuls (linear layers, attention) compute "
    "in fp16, ops on autocast's fp32 list (softmax, LayerNorm) stay fp32. Dynamic loss "
    "scaling: `torch.amp.GradScaler` multiplies the loss before backward, the "
    "gradients are unscaled before clipping, and a step whose gradients overflow is "
    "skipped and the scale lowered (`ShardedGradScaler` under FSDP, so every rank "
    "decides alike). Master weights and AdamW states stay fp32.",
    "bf16": "**bf16**: the forward pass runs under "
    "`torch.autocast(dtype=torch.bfloat16)` (matmuls in bf16, autocast's fp32 ops in "
    "fp32), without loss scaling: bf16 has fp32's 8-bit exponent, so gradients do not "
    "underflow the way fp16's do. Master weights and AdamW states stay fp32.",
}


def common(runs: Sequence[Run], key: str) -> Any:
    """The config value all runs share, or the string "varies (see Runs)"."""
    values = {show(r.config.get(key)) for r in runs}
    return runs[0].config.get(key) if len(values) == 1 else "varies (see Runs)"


def common_summary(runs: Sequence[Run], key: str) -> Any:
    values = {json.dumps(r.get(key), sort_keys=True) for r in runs}
    return runs[0].get(key) if len(values) == 1 else "varies (see Runs)"


def approach_text(
    runs: Sequence[Run], varied: Sequence[str], manifests: Sequence[dict]
) -> str:
    how = (
        "cells of a `distrib-gpt sweep`, each its own process"
        if manifests
        else "separate `distrib-gpt train` runs"
    )
    differ = (
        ", ".join(f"`{k}`" for k in varied)
        if varied
        else "nothing (repeats of one config)"
    )
    return (
        f"**Approach.** {len(runs)} training runs of the recipe in "
        f"`distrib_gpt/train.py` ({how}), differing only in {differ}. Each run trains "
        f"for `train.epochs` = {show(common(runs, 'train.epochs'))} (`train.max_steps` "
        f"= {show(common(runs, 'train.max_steps'))}) and measures "
        "the mean token loss over the supervised tokens of a fixed subset of the "
        "training split (`eval.train_subset_batches` = "
        f"{show(common(runs, 'eval.train_subset_batches'))}, null = all) and of the "
        "validation split "
        f"(`eval.val_batches` = {show(common(runs, 'eval.val_batches'))}) before "
        "training and after every epoch. Throughput, epoch time, memory and checkpoint "
        "size are the trainer's own measurements, copied from each run's "
        "`summary.json` (definitions: docs/training.md)."
    )


def model_text(runs: Sequence[Run]) -> str:
    r = runs[0]
    c = r.config
    shape = ", ".join(
        f"{k.split('.')[1]} {show(c.get(k))}"
        for k in ("model.n_layer", "model.n_head", "model.n_embd")
        if c.get(k) is not None
    )
    init = (
        "trained from scratch (GPT-2's initialisation)"
        if c.get("model.init") == "scratch"
        else "initialised from the pretrained weights of "
        f"`{c.get('model.pretrained_path') or c.get('model.name')}`"
    )
    return (
        f"**Model.** GPT-2 `{c.get('model.name')}`"
        + (f" ({shape})" if shape else "")
        + f", {show(c.get('model.block_size'))} positions, "
        f"{fmt(r.get('params'), 'int')} parameters (tied embedding / LM head counted "
        f"once), {init}; dropout {show(common(runs, 'model.dropout'))}."
    )


def data_text(runs: Sequence[Run]) -> str:
    r = runs[0]
    c = r.config
    counts = r.get("data_counts") or {}
    split = "; ".join(
        f"{name}: {fmt(v.get('examples'), 'int')} examples, "
        f"{fmt(v.get('tokens'), 'int')} tokens "
        f"({fmt(v.get('supervised_tokens'), 'int')} supervised)"
        for name, v in counts.items()
        if name in ("train", "val")
    )
    masking = (
        "prompt and response tokens"
        if c.get("data.train_on_prompt")
        else "response tokens only (prompt tokens masked)"
    )
    batching = {
        "pack": "holding whole examples packed per row, each attending only to itself from position 0",
        "pack_concat": "holding whole examples packed per row and read as one text (cross-attending)",
        "pad": "one example per row, padded per batch",
    }
    return (
        f"**Data.** `{c.get('data.source')}` ({c.get('data.format')} schema, "
        f"`{c.get('data.template')}` prompt template), `data.max_examples` = "
        f"{show(c.get('data.max_examples'))}, {show(c.get('data.val_fraction'))} held "
        f"out for "
        "validation, tokenized with GPT-2's BPE; sequences of "
        f"{show(common(runs, 'data.seq_len'))} tokens "
        f"{batching.get(c.get('data.batching'), c.get('data.batching'))}; loss on "
        f"{masking}. "
        + (f"Counts: {split}. " if split else "")
        + f"Tokenized data `{r.get('data_manifest_key')}` (the shards' manifest key)."
    )


def precision_text(runs: Sequence[Run]) -> str:
    policies = list(dict.fromkeys(str(r.get("precision")) for r in runs))
    lines = [
        "**Precision** (`distrib_gpt/precision.py`). Master weights and optimizer "
        "states are fp32 in every policy; only the compute of the forward and backward "
        "passes changes, and the cross-entropy is always computed in fp32 "
        "(half-precision logits are upcast)."
    ]
    lines += [f"- {PRECISION_MECHANICS.get(p, f'**{p}**')}" for p in policies]
    if any(r.get("device") == "cpu" for r in runs) and {"fp16", "bf16"} & set(policies):
        lines.append(
            '- On a CPU, fp16 and bf16 use CPU autocast (and `GradScaler("cpu")` for '
            "fp16), the same code path as on a GPU."
        )
    for r in runs:
        if r.get("precision_requested") != r.get("precision"):
            lines.append(
                f"- {r.label}: `precision: {r.get('precision_requested')}` resolved to "
                f"{r.get('precision')} on {r.get('device_name')}."
            )
        if r.get("precision_note"):
            lines.append(f"- {r.label}: {r.get('precision_note')}.")
    if any(r.config.get("parallel.strategy") in FSDP_STRATEGIES for r in runs):
        lines.append(
            "- Under FSDP2 (`fsdp_full`, `fsdp_grad_op`, `hsdp`) the policy is also "
            "given to `fully_shard` as `MixedPrecisionPolicy(param_dtype=<autocast "
            "dtype>, reduce_dtype=fp32)` (or the compute dtype with "
            "`parallel.reduce_dtype: param`; here "
            f"{show(common(runs, 'parallel.reduce_dtype'))}): parameters are "
            "all-gathered in the compute dtype, and autocast stays on around the "
            "forward as under DDP."
        )
    return "\n".join(lines)


def strategy_text(runs: Sequence[Run]) -> str:
    devices = sorted({f"{r.get('device')} ({r.get('device_name')})" for r in runs})
    return (
        "**Strategy and device.** `parallel.strategy` = "
        f"{show(common(runs, 'parallel.strategy'))}; processes per run: "
        f"{show(common_summary(runs, 'world_size'))}, nodes: "
        f"{show(common_summary(runs, 'num_nodes'))}; "
        "`parallel.activation_checkpointing` = "
        f"{show(common(runs, 'parallel.activation_checkpointing'))}, "
        f"`parallel.compile` = {show(common(runs, 'parallel.compile'))}. Device: "
        f"{', '.join(devices)}."
    )


def lora_text(runs: Sequence[Run]) -> Optional[str]:
    lora = [r for r in runs if r.config.get("lora.enabled")]
    if not lora:
        return None
    c = lora[0].config
    trainable = ", ".join(
        f"{r.label}: {fmt(r.get('trainable_params'), 'int')} of "
        f"{fmt(r.get('params'), 'int')}"
        for r in lora
    )
    return (
        f"**LoRA** (`distrib_gpt/lora.py`, in {len(lora)} of {len(runs)} runs). The "
        "targeted Linear layers "
        f"({', '.join(f'`{t}`' for t in c.get('lora.targets') or [])}) are frozen and "
        "get W + (alpha/rank)·B·A with "
        f"rank {show(c.get('lora.rank'))}, alpha {show(c.get('lora.alpha'))}, adapter "
        f"dropout {show(c.get('lora.dropout'))}, biases "
        f"{'trained' if c.get('lora.train_bias') else 'frozen'}; only the "
        "adapters are in the optimizer. "
        f"Trainable parameters: {trainable}. The final checkpoint holds the merged "
        "weights (its size is the full model's); the adapters alone are in `adapter/` "
        "(the ablation grid's adapter column)."
    )


HYPERPARAMETERS = (
    ("train.epochs", "epochs"),
    ("train.max_steps", "optimizer step limit"),
    ("train.micro_batch_size", "sequences per micro-batch"),
    ("train.grad_accum", "micro-batches per optimizer step"),
    ("data.seq_len", "tokens per sequence"),
    ("optim.lr", "peak learning rate (AdamW)"),
    ("optim.warmup_steps", "linear warmup steps"),
    ("optim.min_lr_ratio", "cosine floor, fraction of lr"),
    ("optim.betas", "AdamW betas"),
    ("optim.eps", "AdamW eps"),
    ("optim.weight_decay", "weight decay (2-D weights only)"),
    ("optim.grad_clip", "gradient-norm clip"),
    ("model.dropout", "dropout"),
    ("run.seed", "seed"),
    ("precision", "precision policy requested"),
    ("parallel.strategy", "strategy"),
    ("parallel.activation_checkpointing", "activation checkpointing"),
    ("lora.enabled", "LoRA"),
)


def hyperparameter_table(runs: Sequence[Run]) -> str:
    rows = [
        f"| `{k}` | {what} | {show(common(runs, k))} |" for k, what in HYPERPARAMETERS
    ]
    gb = common_summary(runs, "global_batch_sequences")
    rows.append(
        "| global batch | micro-batch x accumulation x processes, sequences | "
        f"{show(gb)} |"
    )
    rows.append(
        f"| steps | optimizer steps run | {show(common_summary(runs, 'steps'))} |"
    )
    return "\n".join(
        [
            "**Hyperparameters.**",
            "",
            "| key | meaning | value |",
            "| --- | --- | --- |",
            *rows,
        ]
    )


def libraries_text(runs: Sequence[Run]) -> str:
    import matplotlib

    envs = {
        json.dumps(
            {k: v for k, v in (r.get("environment") or {}).items() if k != "hostname"},
            sort_keys=True,
        )
        for r in runs
    }
    env = runs[0].get("environment") or {}
    torchao = sorted(
        {r.quant.get("torchao") for r in runs if r.quant and r.quant.get("torchao")}
    )
    parts = [
        f"Python {env.get('python')}",
        f"PyTorch {env.get('torch')} (autocast, GradScaler, DDP / FSDP2, distributed "
        "checkpoints)",
        f"CUDA {env.get('cuda') or 'none (CPU build)'}",
        f"transformers {env.get('transformers')} (pretrained GPT-2 loading, HF export)",
        f"numpy {env.get('numpy')}",
        "tiktoken (GPT-2 BPE, built offline)",
        "safetensors (checkpoints)",
    ]
    if torchao:
        parts.append(f"torchao {', '.join(torchao)} (int8)")
    text = (
        "**Tools and libraries.** "
        + "; ".join(parts)
        + f"; this report: matplotlib {matplotlib.__version__}. "
        f"Host: {env.get('hostname')}, {env.get('cpu_count')} CPUs."
    )
    if len(envs) > 1:
        text += (
            " **The runs' library versions differ**: compare their `summary.json` "
            "`environment`."
        )
    return text


def method_section(
    runs: Sequence[Run], varied: Sequence[str], manifests: Sequence[dict]
) -> str:
    parts = [
        approach_text(runs, varied, manifests),
        model_text(runs),
        data_text(runs),
        precision_text(runs),
        strategy_text(runs),
        lora_text(runs),
        hyperparameter_table(runs),
        libraries_text(runs),
    ]
    return "## Method\n\n" + "\n\n".join(p for p in parts if p)


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    markdown: str
    data: dict
    figures: dict[str, Callable[[Path], None]]


def build_report(
    runs: list[Run],
    manifests: Sequence[dict],
    warnings: list[str],
    allow_mixed: bool = False,
    title: Optional[str] = None,
    command: Optional[str] = None,
) -> Report:
    """Everything the report holds, from loaded runs; nothing is written."""
    mixed = check_comparable(runs, allow_mixed)
    varied = varied_keys(runs, [k for m in manifests for k in m.get("grid", {})])
    assign_labels(runs, varied)
    baselines = pick_baselines(runs)
    notes = Footnotes()
    tables = [
        results_table(runs),
        val_loss_table(runs),
        ratios_table(runs, baselines),
        ablation_table(runs, varied),
    ]
    quant = int8_table(runs)
    runs_t = runs_table(runs, varied)

    def table(name: str) -> Table:
        return next(
            t for t in [runs_t, *tables, quant] if t is not None and t.name == name
        )

    title = title or "Run report: " + (
        ", ".join(sorted({m.get("sweep", "") for m in manifests})) or runs[0].name
    )
    md: list[str] = [f"# {title}", ""]
    md += provenance(manifests, command)
    if mixed:
        md += [
            "> **⚠ Mixed runs (--allow-mixed).** These runs differ in data or model, "
            "so their figures are not a like-for-like comparison; runs marked ⚠ differ "
            "from the data and model most runs share:",
            ">",
        ]
        md += [f"> - {line}" for line in mixed] + [""]
    md += [f"> Note: {w}" for w in warnings] + ([""] if warnings else [])
    md += ["## Runs", "", render_table(runs_t, notes), ""]
    md += [
        "## Results",
        "",
        "Per run, from its `summary.json`: tokens/s over timed optimizer steps (real, "
        "non-pad input tokens; the first step is warm-up), mean wall time of an "
        "epoch's training steps, peak memory, on-disk size of the final consolidated "
        "checkpoint, the training-subset loss before training (epoch 0) and after each "
        "epoch, model FLOPs utilisation and the share of pad tokens. MiB = 2^20 bytes.",
        "",
        render_table(table("results"), notes),
        "",
        render_table(table("val_loss"), notes),
        "",
    ]
    md += ["## Against fp32", ""]
    if table("vs_fp32").rows:
        md += [
            "Each run against the fp32 run whose other settings match it best (named "
            "in the table). Speedups above 1x are faster; memory and size ratios below "
            "1x are smaller.",
            "",
            render_table(table("vs_fp32"), notes),
            "",
        ]
        md += baseline_notes(runs, baselines)
    else:
        md += [
            "No fp32 run among these runs: no ratios (add `precision=fp32` to the "
            "sweep for a baseline).",
            "",
        ]
    md += [
        "## Figures",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![throughput and epoch time](throughput.png)",
        "",
        "![peak memory and checkpoint size](memory.png)",
        "",
    ]
    md += [
        "## Ablation grid",
        "",
        "One row per run over precision x gradient accumulation x activation "
        "checkpointing x LoRA"
        + (
            f" (and {', '.join(f'`{k}`' for k in varied if k not in ABLATION_KEYS)})"
            if set(varied) - set(ABLATION_KEYS)
            else ""
        )
        + ": peak memory (the CUDA allocator's peak on a GPU, the process's peak RSS "
        "on a CPU, as labelled) and time.",
        "",
        render_table(table("ablation"), notes),
        "",
    ]
    md += ["## int8 inference", ""]
    if quant is not None:
        md += [
            "From each run's `quant_summary.json` (`distrib-gpt quantize`, "
            "docs/inference.md): validation loss of the fp32 and int8 models on the "
            "same batches, the quality gate, file sizes, and timings, each model in a "
            "fresh process.",
            "",
            render_table(quant, notes),
            "",
        ]
    else:
        md += [
            "No run has a `quant_summary.json` (`distrib-gpt quantize --checkpoint "
            "RUN/checkpoint --out RUN/checkpoint_int8`, or "
            "`quantize.after_training=true`, writes one).",
            "",
        ]
    md += [method_section(runs, varied, manifests), ""]
    if notes.texts:
        md += [notes.render(), ""]
    data = {
        "title": title,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "sweeps": [m.get("command") for m in manifests],
        "varied_keys": varied,
        "warnings": warnings + mixed,
        "runs": [
            {
                "label": r.label,
                "dir": str(r.dir),
                "flagged": r.flagged,
                "quant_summary": str(r.quant_path) if r.quant_path else None,
            }
            for r in runs
        ],
        "baselines": {
            label: (b.label if b else None) for label, b in baselines.items()
        },
        "tables": {
            t.name: t.to_json() for t in [runs_t, *tables, quant] if t is not None
        },
        "figures": list(FIGURES),
    }
    figures = {
        "loss_curves.png": lambda p: plot_loss_curves(runs, p),
        "throughput.png": lambda p: plot_throughput(runs, p),
        "memory.png": lambda p: plot_memory(runs, p),
    }
    return Report("\n".join(md), data, figures)


def provenance(manifests: Sequence[dict], command: Optional[str]) -> list[str]:
    """The commands that produced the runs and this report."""
    lines = ["```bash"] + [m["command"] for m in manifests if m.get("command")]
    if command:
        lines.append(command)
    lines.append("```")
    return (["Generated by:", "", *lines, ""]) if len(lines) > 2 else []


def baseline_notes(
    runs: Sequence[Run], baselines: dict[str, Optional[Run]]
) -> list[str]:
    """Say where a run's baseline differs from it in more than precision."""
    out = []
    for r in runs:
        b = baselines[r.label]
        if b is not None and b is not r:
            extra = settings_differences(r, b, ignore=("precision",))
            if extra:
                out.append(
                    f"- {r.label}: its fp32 baseline ({b.label}) also differs in "
                    f"{', '.join(f'`{k}`' for k in extra)}."
                )
    return out + ([""] if out else [])


# ---------------------------------------------------------------------------- output


def check_out_dir(out: Path, run_dirs: Sequence[Path]) -> None:
    """Refuse an output directory that would replace anything but an earlier report."""
    resolved = out.resolve()
    for d in run_dirs:
        if resolved == d or resolved in d.parents:
            raise ReportError(
                f"--out {out}: is or contains the run directory {d}; choose another "
                "directory"
            )
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())
    ):
        raise ReportError(
            f"--out {out}: exists and is not an earlier report (no report.json); "
            "choose another directory"
        )


def write_report(report: Report, out: Path) -> Path:
    """Write report.md, report.json and the PNGs into a temporary sibling of `out`,
    then put it in place of `out` (an earlier report there is replaced)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        (tmp / "report.md").write_text(report.markdown, encoding="utf-8")
        (tmp / "report.json").write_text(
            json.dumps(report.data, indent=2) + "\n", encoding="utf-8"
        )
        for name, draw in report.figures.items():
            draw(tmp / name)
        if out.exists():
            old = out.with_name(f".old-{out.name}-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_report(
    paths: Sequence[str | Path],
    out: str | Path,
    allow_mixed: bool = False,
    title: Optional[str] = None,
    command: Optional[str] = None,
) -> Path:
    """Read the runs, build the report, write it to `out`; returns `out`."""
    run_dirs, manifests, warnings = expand_inputs(paths)
    check_out_dir(Path(out), run_dirs)
    runs = [load_run(d) for d in run_dirs]
    report = build_report(
        runs, manifests, warnings, allow_mixed=allow_mixed, title=title, command=command
    )
    return write_report(report, Path(out))


def report_command(args: Any) -> Path:
    """`distrib-gpt report` (see the module docstring)."""
    argv = ["distrib-gpt", "report", *args.runs, "--out", args.out]
    argv += ["--allow-mixed"] * bool(args.allow_mixed) + (
        ["--title", args.title] if args.title else []
    )
    out = make_report(
        args.runs,
        args.out,
        allow_mixed=args.allow_mixed,
        title=args.title,
        command=shlex.join(argv),
    )
    print(f"wrote {out / 'report.md'} ({', '.join(FIGURES)}, report.json)")
    return out
