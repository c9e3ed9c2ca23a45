"""Every benchmark table in the docs, generated from bench/results/*.json.

A generated block sits in a Markdown file (README.md, docs/**/*.md) between two marker lines:

    <!-- table:NAME -->
    ... generated: rewritten by this script, never edited by hand ...
    <!-- /table:NAME -->

NAME is a key of TABLES (below): one small function per table, reading one JSON file of
bench/results/. Each block also carries the command that wrote the JSON and the machine, date
and versions the JSON records (and says which of those it does not record).

    python bench/tables.py            # rewrite the blocks in place
    python bench/tables.py --check    # exit 1 and print a diff if a doc differs from what it would generate

Standard library only (no torch): it runs in well under a second. A JSON that lacks a key a table
needs stops it with an error naming the file and the key.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OPEN = re.compile(r"<!-- table:(\S+) -->")
CLOSE = re.compile(r"<!-- /table:(\S+) -->")
ANY_MARKER = re.compile(r"<!--\s*/?\s*table\s*:")  # anything that looks like a marker, even a broken one


class TableError(Exception):
    """A table cannot be generated (missing JSON key, malformed markers)."""


# ------------------------------------------------------------------------- reading results


class Results:
    """One JSON file of bench/results/. `need(*keys)` is data[k1][k2]..., or a TableError that
    names the file and the dotted key; `get` is the same with a default instead of the error."""

    def __init__(self, filename: str, data: Any = None):
        self.filename = filename
        self.rel = f"bench/results/{filename}"
        if data is None:
            path = RESULTS / filename
            if not path.exists():
                raise TableError(f"{self.rel}: file not found")
            data = json.loads(path.read_text(encoding="utf-8"))
        self.data = data

    def need(self, *keys: str) -> Any:
        node = self.data
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                raise TableError(f"{self.rel}: missing key {'.'.join(keys[: i + 1])!r}")
            node = node[key]
        return node

    def get(self, *keys: str, default: Any = None) -> Any:
        try:
            return self.need(*keys)
        except TableError:
            return default

    def first(self, *paths: tuple[str, ...]) -> Any:
        """The value at the first of `paths` the JSON has (None if none)."""
        for path in paths:
            value = self.get(*path)
            if value is not None:
                return value
        return None


# ------------------------------------------------------------------------------ formatting


def md_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A Markdown table; columns whose index is in `right` are right-aligned."""
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def num(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f}"


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


# ------------------------------------------------------------------------------ provenance


def _script_flags(script: Path) -> dict[str, Any]:
    """The script's `--flag`s and their defaults (`...` where not a literal), read with ast:
    importing the benchmark would import torch."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    constants = {}  # module-level literals, for defaults such as list(INT8_VARIANTS)
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    flags = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args):
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and str(first.value).startswith("--")):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        default: Any = False if _is_store_true(kw.get("action")) else None
        if "default" in kw:
            default = _literal(kw["default"], constants)
        flags[first.value] = default
    return flags


def _is_store_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value == "store_true"


def _literal(node, constants: dict) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if (  # list(NAME) of a module-level literal
        isinstance(node, ast.Call) and getattr(node.func, "id", "") == "list" and len(node.args) == 1
        and isinstance(node.args[0], ast.Name) and node.args[0].id in constants
    ):
        return list(constants[node.args[0].id])
    return ...


def command(r: Results, settings: dict | None = None) -> str:
    """The command that wrote `r`: the JSON's own "command" if it records one, else
    bench/<file>.py with each recorded setting that differs from the script's default."""
    if r.get("command"):
        return r.need("command")
    script = f"bench/{Path(r.filename).stem}.py"
    settings = r.get("settings", default={}) if settings is None else settings
    parts = ["python", script]
    for flag, default in _script_flags(ROOT / script).items():
        key = flag[2:].replace("-", "_")
        value = settings.get(key)
        if key == "out" or value is None or value is False or value == default:
            continue
        parts.append(flag)
        if value is not True:
            parts += [shlex.quote(str(v)) for v in (value if isinstance(value, list) else [value])]
    return " ".join(parts + ["--out", r.rel])


def provenance(r: Results, settings: dict | None = None) -> str:
    """Where the figures come from: command, then what the JSON records about the machine."""
    first = r.first
    cores = first(
        ("machine", "cpu_count"), ("environment", "nproc"), ("environment", "cpu_count"), ("settings", "cpu_count")
    )
    threads = first(("machine", "torch_threads"), ("settings", "torch_threads"))
    mem = first(("environment", "mem_total_bytes"), ("machine", "mem_total_bytes"))
    flags = first(("machine", "cpu", "flags"))
    fields = {
        "date": first(("date",), ("environment", "date"), ("machine", "date")),
        "CPU": first(("machine", "cpu", "model_name"), ("environment", "cpu_model"), ("machine", "cpu_model")),
        "cores": cores,
        "torch threads": threads,
        "CPU capability": first(("machine", "cpu_capability")),
        "SIMD flags": " ".join(flags) if flags else None,
        "memory": f"{mem / 2**30:.0f} GiB" if mem else None,
        "device": first(("environment", "device")),
        "GPU": first(("environment", "gpu"), ("machine", "gpu")),
    }
    for package in ("python", "torch", "torchao", "transformers", "accelerate"):
        fields[package] = first(("environment", package), ("machine", package), ("versions", package))
    if first(("machine", "fbgemm")) is not None:
        fields["fbgemm available"] = "yes" if first(("machine", "fbgemm")) else "no"
    commit = first(("environment", "git_commit"), ("machine", "git_commit"))
    if commit:
        dirty = first(("environment", "git_dirty"), ("machine", "git_dirty"))
        fields["code"] = f"commit {commit}" + (" with uncommitted changes" if dirty else "")
    wall = first(("wall_time_s",), ("environment", "seconds"))
    fields["wall time"] = duration(wall) if wall is not None else None
    recorded = "; ".join(f"{k} {v}" for k, v in fields.items() if v not in (None, "", []))
    missing = [k for k in ("date", "CPU", "torch") if not fields[k]]
    text = f"Source: `{r.rel}`, written by `{command(r, settings)}`. Recorded in it: {recorded}."
    if missing:
        text += f" Not recorded in it: {', '.join(missing)}."
    return text


# ------------------------------------------------------------------ train_throughput.json

TRAINER_LABELS = {
    "hf_trainer": "HF `Trainer` + `DataCollatorForSeq2Seq`",
    "ours_pack": "distrib_gpt, `data.batching=pack`",
    "ours_pad": "distrib_gpt, `data.batching=pad`",
    "ours_pad_full_head": "distrib_gpt, `pad`, LM head forced at every position",
}


def table_train_throughput(r: Results) -> str:
    """Our trainer vs the HF Trainer, real tokens/s; plus `before_after` when the JSON has it."""
    rounds = r.need("tokens_per_s")
    medians = r.need("median_tokens_per_s")
    hf = r.need("median_tokens_per_s", "hf_trainer")
    rows = [
        [TRAINER_LABELS.get(k, f"`{k}`"), ", ".join(num(x) for x in rounds[k]), num(medians[k]), ratio(medians[k] / hf)]
        for k in medians
    ]
    s = lambda key: r.need("settings", key)  # noqa: E731
    settings = (
        f"Settings: {s('n_layer')} layers, {s('n_head')} heads, {s('n_embd')} wide, GPT-2 vocabulary; micro-batch "
        f"{s('batch')} x {s('seq_len')} tokens; {s('steps')} optimizer steps; the first {num(s('examples'))} "
        f"examples; AdamW lr {s('lr')}; seed {s('seed')}; {s('repeats')} alternating rounds, medians reported."
    )
    parts = [md_table(["trainer", "real tokens/s per round", "median", "vs HF Trainer"], rows, {1, 2, 3}), settings]
    if r.get("before_after") is not None:
        parts.append(_before_after(r))
    return "\n\n".join(parts + [provenance(r)])


def _before_after(r: Results) -> str:
    b = lambda key: r.need("before_after", key)  # noqa: E731
    before, after = statistics.median(b("before_tokens_per_s")), statistics.median(b("after_tokens_per_s"))
    rows = [
        [b("label_before"), ", ".join(num(x) for x in b("before_tokens_per_s")), num(before), ratio(1.0)],
        [b("label_after"), ", ".join(num(x) for x in b("after_tokens_per_s")), num(after), ratio(after / before)],
    ]
    header = ["version", "real tokens/s per round", "median", "after / before"]
    return "Before / after:\n\n" + md_table(header, rows, {1, 2, 3})


# ------------------------------------------------------------------------ quickstart.json


def table_quickstart(r: Results) -> str:
    """Wall time and figures of `distrib-gpt train --config configs/quickstart.yaml`."""
    s = lambda key: r.need("summary", key)  # noqa: E731
    losses = s("train_loss_by_epoch")
    row = [
        duration(r.need("wall_time_s")), num(s("steps")), num(s("epochs_completed")),
        ", ".join(f"{x:.2f}" for x in losses), num(s("tokens_per_s")),
    ]
    header = ["wall time, whole command", "optimizer steps", "epochs",
              "training loss by epoch (first: before training)", "real tokens/s"]
    text = md_table(header, [row], {0, 1, 2, 4})
    text += f"\n\nTimed: `{r.need('timed_command')}` (data preparation, evaluations and checkpoints included)."
    share = r.get("other_cpu_share")
    if share is not None:
        text += f" Other processes used {share:.0%} of the CPUs meanwhile."
    return text + "\n\n" + provenance(r)


# ---------------------------------------------------------------------- int8_inference.json


def _int8_variants(r: Results, section: str) -> str:
    """fp32 vs bf16 vs the int8 variants of one model: size, loss, speed, memory."""
    names = list(r.need(section, "variants"))
    v = lambda name, *keys: r.need(section, "variants", name, *keys)  # noqa: E731
    batches = sorted(v("fp32", "decode_tokens_per_s"), key=int)
    with_loss = any("val_loss" in r.need(section, "variants", n) for n in names)
    header = ["variant", "int8 kernel", "file MiB", "vs fp32"]
    header += ["val loss", "vs fp32"] if with_loss else []
    header += ["prefill ms (b=1)"]
    for b in batches:
        header += [f"decode tok/s b={b}", "vs fp32"]
    header += ["peak RSS MiB (above base)"]
    rows = []
    for name in names:
        row = [name, " + ".join(v(name, "int8_kernels")) or "-", mib(v(name, "file_bytes")),
               f"{v(name, 'file_bytes') / v('fp32', 'file_bytes'):.1%}"]
        if with_loss:
            loss, base = v(name, "val_loss"), v("fp32", "val_loss")
            row += [f"{loss:.4f}", f"{(loss - base) / base:+.3%}"]
        row += [num(v(name, "prefill_ms_batch1"), 1)]
        for b in batches:
            tps = v(name, "decode_tokens_per_s", b)
            row += [num(tps, 1), ratio(tps / v("fp32", "decode_tokens_per_s", b))]
        row += [f"{mib(v(name, 'peak_rss_bytes'))} ({mib(v(name, 'peak_rss_above_baseline_bytes'))})"]
        rows.append(row)
    return md_table(header, rows, set(range(2, len(header))))


def table_int8_gpt2_124m(r: Results) -> str:
    """GPT-2 124M's shape, random weights: size and speed only."""
    return _int8_variants(r, "gpt2_124m_random") + "\n\n" + provenance(r)


def table_int8_quickstart(r: Results) -> str:
    """The quickstart model trained by the benchmark: size, validation loss, speed."""
    return _int8_variants(r, "trained") + "\n\n" + provenance(r)


INT8_MODELS = {"gpt2_124m_random": "gpt2-124M shape (random weights)", "trained": "quickstart model (trained)"}


def table_int8_ours_vs_hf(r: Results) -> str:
    """Our `generate` vs transformers' on the same fp32 weights, decode tokens/s."""
    batches = r.need("settings", "batch_sizes")
    header = ["model", "greedy tokens match"]
    for b in batches:
        header += [f"b={b}: ours tok/s", "HF tok/s", "ours / HF"]
    rows = []
    for section, label in INT8_MODELS.items():
        h = lambda key: r.need(section, "ours_vs_hf", key)  # noqa: E731
        row = [label, "yes" if h("greedy_tokens_match") else "**no**"]
        for b in batches:
            row += [num(h(f"ours_decode_tokens_per_s_batch{b}"), 1), num(h(f"hf_decode_tokens_per_s_batch{b}"), 1),
                    ratio(h(f"ours_vs_hf_batch{b}"))]
        rows.append(row)
    return md_table(header, rows, set(range(2, len(header)))) + "\n\n" + provenance(r)


def table_int8_kernels(r: Results) -> str:
    """µs per call of each kernel on each GPT-2 124M layer shape at batch 1."""
    shapes = r.need("kernels_batch1_us")
    k = lambda shape, name: r.need("kernels_batch1_us", shape, name)  # noqa: E731
    first = next(iter(shapes))
    kernels = [n for n in r.need("kernels_batch1_us", first) if n != "other_cpu_share"]
    header = ["kernel"] + [s.replace("x", " x ") for s in shapes]
    rows = [
        [name] + [f"{num(k(s, name))} ({ratio(k(s, 'fp32 F.linear') / k(s, name))})" for s in shapes]
        for name in kernels
    ]
    text = md_table(header, rows, set(range(1, len(header))))
    text += ("\n\nµs per call at batch 1 (median), one GPT-2 124M layer (in x out), weights read from DRAM; "
             "in brackets: fp32's time / this one (above 1x: faster than fp32).")
    busiest = max(shapes, key=lambda s: shapes[s].get("other_cpu_share", 0.0))
    share = shapes[busiest].get("other_cpu_share")
    if share is not None:
        text += f" Other processes used up to {share:.0%} of the CPUs while these ran ({busiest.replace('x', ' x ')})."
    return text + "\n\n" + provenance(r)


# the int8 goals: file size (fraction of fp32's), |relative loss change|, batch-1 decode speed-up
FILE_MAX, LOSS_MAX, DECODE_MIN = 0.30, 0.01, 1.5


def table_int8_targets(r: Results) -> str:
    """The int8 goals, met or missed, for `int8_dynamic` (the default) against fp32."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = {
        "file": [f"file ≤ {FILE_MAX:.0%} of fp32's"],
        "loss": [f"validation loss within {LOSS_MAX:.0%} of fp32's"],
        "decode": [f"decode tokens/s at batch 1 ≥ {DECODE_MIN}x fp32's"],
    }
    for section in INT8_MODELS:
        v = lambda *keys: r.need(section, "variants", *keys)  # noqa: E731
        size = v("int8_dynamic", "file_bytes") / v("fp32", "file_bytes")
        rows["file"].append(f"{size:.1%}: {verdict(size <= FILE_MAX)}")
        if "val_loss" in v("int8_dynamic"):
            delta = (v("int8_dynamic", "val_loss") - v("fp32", "val_loss")) / v("fp32", "val_loss")
            rows["loss"].append(f"{delta:+.3%}: {verdict(abs(delta) <= LOSS_MAX)}")
        else:
            rows["loss"].append("not measurable (random weights)")
        speed = v("int8_dynamic", "decode_tokens_per_s", "1") / v("fp32", "decode_tokens_per_s", "1")
        rows["decode"].append(f"{ratio(speed)}: {verdict(speed >= DECODE_MIN)}")
    header = ["target (`int8_dynamic`, the default, vs fp32)"] + list(INT8_MODELS.values())
    return md_table(header, list(rows.values())) + "\n\n" + provenance(r)


# ---------------------------------------------------------------------- plan_vs_measured.json


def table_plan_vs_measured(r: Results) -> str:
    """The planner's per-GPU terms against one measured training step, per case."""
    cases = {c["case"]["name"]: c["case"] for c in r.need("raw")}
    terms: dict[str, dict[str, dict]] = {}  # case -> term -> {"planned", "measured", "error"}
    for row in r.need("rows"):
        terms.setdefault(row["case"], {})[row["term"]] = row

    def term(case: str, name: str, key: str) -> float:
        if name not in terms[case] or key not in terms[case][name]:
            raise TableError(f"{r.rel}: missing key 'rows' entry {key!r} of term {name!r} for case {case!r}")
        return terms[case][name][key]

    def pair(case: str, *names: str) -> str:
        planned, measured = (sum(term(case, n, key) for n in names) / 2**20 for key in ("planned", "measured"))
        return f"{num(planned, 2)} / {num(measured, 2)}"

    rows = []
    for case in terms:
        if case not in cases:
            raise TableError(f"{r.rel}: missing key 'raw' entry for case {case!r}")
        rows.append([
            case, f"{cases[case]['b']} x {cases[case]['s']}", pair(case, "params", "grads", "optimizer"),
            pair(case, "ddp_buckets") if "ddp_buckets" in terms[case] else "-", pair(case, "saved_for_backward"),
            num(term(case, "peak_delta", "planned") / 2**20, 2), num(term(case, "peak_delta", "measured") / 2**20, 2),
            f"{term(case, 'peak_delta', 'error'):+.1%}",
        ])
    header = ["case", "b x s", "params + grads + AdamW, MiB (planned / measured)", "DDP buckets, MiB",
              "saved for backward, MiB (planned / measured)", "step peak, planned MiB", "step peak, measured MiB",
              "error"]

    exact = [t for case in terms for name, t in terms[case].items() if name != "peak_delta"]
    n_exact = sum(t["planned"] == t["measured"] for t in exact)
    by_strategy: dict[str, list[float]] = {}
    for case in terms:
        by_strategy.setdefault(cases[case].get("strategy", "one process"), []).append(term(case, "peak_delta", "error"))
    spans = "; ".join(
        f"{k} {min(e):+.1%}" + (f" to {max(e):+.1%}" if len(e) > 1 else "") for k, e in by_strategy.items()
    )
    summary = (
        f"Every term but the step peak: {n_exact} of {len(exact)} planned figures equal the measured bytes. "
        f"Step peak error, (planned - measured) / measured, by strategy: {spans}."
    )
    settings = {"device": r.get("environment", "device")}
    return "\n\n".join([md_table(header, rows, {5, 6, 7}), summary, provenance(r, settings)])


# ------------------------------------------------------------------------------ packing.json

BATCHING_LABELS = {
    "pad": "(a) `pad`: one example per row",
    "pack": "(b) `pack`: document-masked",
    "pack_concat": "(c) `pack_concat`: cross-attending",
}
CONTROL_LABEL = "(a') `pad` without length bucketing (control)"


def _packing_settings(r: Results) -> str:
    s = lambda key: r.need("settings", key)  # noqa: E731
    return (
        f"Settings: {s('n_layer')} layers, {s('n_head')} heads, {s('n_embd')} wide, GPT-2 vocabulary, random "
        f"init (seed {s('seed')}), fp32; rows of {s('seq_len')} tokens; {s('rows')} packed rows per micro-batch, "
        f"`pad` the same number of examples per step; AdamW lr {s('lr')}; the first {num(s('examples'))} records "
        "of each data set."
    )


def table_packing_quality(r: Results) -> str:
    """Validation loss of each mode's model, every example evaluated alone from position 0."""
    steps = r.need("settings", "steps")
    rows = []
    for mode, label in (BATCHING_LABELS | {"pad_unbucketed": CONTROL_LABEL}).items():
        row = [label]
        for name in ("bundled", "synthetic"):
            m = r.need("quality", name, "modes", mode)
            row += [f"{m['val_loss_alone']:.3f}", f"{m['padding_fraction']:.1%}"]
        rows.append(row)
    header = ["batching", "bundled sample: val loss", "padding", "synthetic copy task: val loss", "padding"]
    per_row = ", ".join(
        f"{name} {r.need('quality', name, 'examples_per_packed_row'):.2f}" for name in ("bundled", "synthetic")
    )
    text = (
        f"Each model trained {steps} optimizer steps, then evaluated on every validation example alone "
        f"(`distrib-gpt eval ... data.batching=pad`). Mean examples per packed row: {per_row}."
    )
    return "\n\n".join([md_table(header, rows, {1, 2, 3, 4}), text, _packing_settings(r), provenance(r)])


def table_packing_padding(r: Results) -> str:
    """Padding fraction per mode and seq_len (the loader's batches, no training)."""
    by_seq = r.need("padding_by_seq_len")
    header = ["batching"] + [f"seq_len {seq}" for seq in by_seq]
    rows = [[f"`{m}`"] + [f"{by_seq[seq][m]:.1%}" for seq in by_seq] for m in BATCHING_LABELS]
    text = f"The whole bundled sample, {r.need('settings', 'rows')} rows a batch, epoch 0."
    return "\n\n".join([md_table(header, rows, set(range(1, len(header)))), text, provenance(r)])


def table_packing_speed(r: Results) -> str:
    """Real tokens/s of the three modes, interleaved rounds."""
    rounds, med = r.need("speed_tokens_per_s"), r.need("speed_median_tokens_per_s")
    labels = BATCHING_LABELS | {"pad_unbucketed": CONTROL_LABEL}
    rows = [[labels[m], ", ".join(num(x) for x in rounds[m]), num(med[m]), ratio(med["pack"] / med[m])] for m in med]
    header = ["batching", "real tokens/s per round", "median", "`pack` / this"]
    text = (
        f"{r.need('settings', 'speed_steps')} optimizer steps a run on the bundled sample, each run a fresh process, "
        f"{r.need('settings', 'rounds')} rounds in rotating order. Other processes used "
        f"{r.need('other_cpu_share'):.0%} of the CPUs during the benchmark."
    )
    return "\n\n".join([md_table(header, rows, {1, 2, 3}), text, _packing_settings(r), provenance(r)])


# ----------------------------------------------------------------------------------- docs

TABLES: dict[str, tuple[str, Callable[[Results], str]]] = {
    "train_throughput": ("train_throughput.json", table_train_throughput),
    "quickstart": ("quickstart.json", table_quickstart),
    "int8_gpt2_124m": ("int8_inference.json", table_int8_gpt2_124m),
    "int8_quickstart": ("int8_inference.json", table_int8_quickstart),
    "int8_ours_vs_hf": ("int8_inference.json", table_int8_ours_vs_hf),
    "int8_kernels": ("int8_inference.json", table_int8_kernels),
    "int8_targets": ("int8_inference.json", table_int8_targets),
    "plan_vs_measured": ("plan_vs_measured.json", table_plan_vs_measured),
    "packing_padding": ("packing.json", table_packing_padding),
    "packing_quality": ("packing.json", table_packing_quality),
    "packing_speed": ("packing.json", table_packing_speed),
}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def block(name: str, results: dict[str, Results]) -> str:
    filename, fn = TABLES[name]
    if filename not in results:
        results[filename] = Results(filename)
    note = f"<!-- generated by `python bench/tables.py` from bench/results/{filename}: do not edit by hand -->"
    return f"{note}\n\n{fn(results[filename]).rstrip()}\n\n"


def render(text: str, where: str, results: dict[str, Results]) -> str:
    """`text` with every marked block regenerated; markers must be whole lines, paired, known."""
    out: list[str] = []
    inside: tuple[str, int] | None = None
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        stripped = line.strip()
        opened, closed = OPEN.fullmatch(stripped), CLOSE.fullmatch(stripped)
        if ANY_MARKER.search(line) and not (opened or closed):
            raise TableError(f"{where}:{lineno}: malformed table marker (a marker is a whole line: "
                             f"'<!-- table:NAME -->' or '<!-- /table:NAME -->')")
        if opened:
            if inside:
                raise TableError(f"{where}:{lineno}: table {opened[1]!r} opens inside {inside[0]!r} (line {inside[1]})")
            if opened[1] not in TABLES:
                raise TableError(f"{where}:{lineno}: unknown table {opened[1]!r} (known: {', '.join(TABLES)})")
            inside = (opened[1], lineno)
            out += [line, block(opened[1], results)]
        elif closed:
            if not inside:
                raise TableError(f"{where}:{lineno}: '/table:{closed[1]}' closes no open table")
            if closed[1] != inside[0]:
                raise TableError(
                    f"{where}:{lineno}: '/table:{closed[1]}' closes table {inside[0]!r} (line {inside[1]})"
                )
            inside = None
            out.append(line)
        elif inside is None:
            out.append(line)
    if inside:
        raise TableError(f"{where}:{inside[1]}: table {inside[0]!r} is never closed")
    return "".join(out)


def markers(text: str) -> list[str]:
    """Names of the tables marked in `text` (opening markers, in order)."""
    return [m[1] for line in text.splitlines() if (m := OPEN.fullmatch(line.strip()))]


def generate() -> dict[Path, tuple[str, str]]:
    """{doc: (current text, generated text)} for every doc with a table marker."""
    results: dict[str, Results] = {}
    out = {}
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        if ANY_MARKER.search(text):
            out[path] = (text, render(text, _rel(path), results))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 and print a diff if a doc is stale")
    args = p.parse_args(argv)
    try:
        docs = generate()
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stale = {path: (old, new) for path, (old, new) in docs.items() if old != new}
    for path, (old, new) in stale.items():
        rel = _rel(path)
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True),
                f"{rel} (in the file)", f"{rel} (generated)",
            ))
        else:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {rel}")
    if args.check and stale:
        print(f"\n{len(stale)} doc(s) differ from bench/results/*.json: run `python bench/tables.py`", file=sys.stderr)
        return 1
    if not stale:
        print(f"{len(docs)} doc(s) with tables, all up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
