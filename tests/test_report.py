"""`distrib-gpt report` on the tiny sweep of tests/test_sweep.py (fp32/bf16 x LoRA
off/on): every seed metric, numbers equal to the runs' summary.json values, ratios
against fp32, the ablation grid, the method section, valid PNGs, refusal of runs of
different data or model, and the int8 section from a real `distrib-gpt quantize`
(--no-measure: timing the tiny model twice would add a minute and test nothing of the
report's).
"""

import json
import re
import shutil
import sys
from pathlib import Path

import matplotlib.image
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import CELLS, SWEEP_NAME, cell_dir, run_cli, shared_sweep  # noqa: E402

from distrib_gpt import report as R  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEED_COLUMNS = [
    "tokens/s",
    "mean epoch time (s)",
    "peak GPU memory (MiB)",
    "peak host RSS (MiB)",
    "checkpoint size (MiB)",
    "train loss after epoch 0",
    "train loss after epoch 1",
    "MFU",
    "MFU peak",
    "padding fraction",
]


@pytest.fixture(scope="module")
def sweep_base(tmp_path_factory):
    return shared_sweep(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def report(sweep_base, tmp_path_factory):
    """The report of the 4-cell sweep: (out dir, report.md text, report.json)."""
    out = tmp_path_factory.mktemp("report") / "out"
    R.make_report([sweep_base / "runs" / SWEEP_NAME], out)
    return (
        out,
        (out / "report.md").read_text(),
        json.loads((out / "report.json").read_text()),
    )


def summaries(sweep_base) -> dict[tuple[str, bool], dict]:
    return {
        cell: json.loads((cell_dir(sweep_base, *cell) / "summary.json").read_text())
        for cell in CELLS
    }


def md_table(
    md: str, first_header: str, contains: str
) -> tuple[list[str], dict[str, list[str]]]:
    """The Markdown table whose header row starts with `first_header` and contains
    `contains`: (headers, {row label: cells})."""
    lines = md.splitlines()
    start = next(
        i
        for i, x in enumerate(lines)
        if x.startswith(f"| {first_header} |") and contains in x
    )
    split = [
        [c.strip() for c in re.split(r"(?<!\\)\|", x)[1:-1]] for x in lines[start:]
    ]
    headers, rows = split[0], {}
    for cells in split[2:]:
        if not cells:
            break
        rows[cells[0]] = cells
    return headers, rows


def assert_table_shows(md: str, table: dict, contains: str) -> None:
    """Every cell of report.json's table appears in report.md through `fmt` (n/a with
    a footnote)."""
    headers, rows = md_table(md, table["columns"][0]["header"], contains)
    assert headers == [c["header"] for c in table["columns"]]
    assert len(rows) == len(table["rows"])
    for row in table["rows"]:
        shown = rows[row["run"]]
        for col, text in zip(table["columns"], shown):
            value = row.get(col["key"])
            if value is None:
                assert re.fullmatch(r"n/a\[\^\d+\]", text), (col, text)
            else:
                assert text == R.fmt(value, col["kind"]), (col, text)


def row_of(data: dict, table: str, precision: str, lora: bool) -> dict:
    label = f"{precision} lora.enabled={str(lora).lower()}"
    (row,) = [r for r in data["tables"][table]["rows"] if r["run"] == label]
    return row


# ------------------------------------------------------------------------ formatting


@pytest.mark.parametrize(
    "value, kind, text",
    [
        (12345.6, "rate", "12,300"),
        (0.012345, "rate", "0.0123"),
        (9.996, "seconds", "10.0"),
        (1.35, "seconds", "1.35"),
        (3 * 2**20, "bytes", "3.00"),
        (0.0030381, "percent", "0.304%"),
        (1.0, "ratio", "1.00x"),
        (10.799563, "loss", "10.7996"),
        (4.43e-05, "delta", "+4.43e-05"),
        (0.0, "delta", "0"),
        (1624544, "int", "1,624,544"),
        (None, "rate", "n/a"),
        (True, "bool", "on"),
    ],
)
def test_fmt(value, kind, text):
    assert R.fmt(value, kind) == text


# --------------------------------------------------------------------------- report


def test_every_seed_metric_equals_the_summaries(report, sweep_base):
    _, md, data = report
    results = data["tables"]["results"]
    assert [c["header"] for c in results["columns"]][1:] == SEED_COLUMNS
    for (precision, lora), s in summaries(sweep_base).items():
        row = row_of(data, "results", precision, lora)
        for key in (
            "tokens_per_s",
            "mean_epoch_time_s",
            "peak_gpu_mem_bytes",
            "peak_host_rss_bytes",
            "checkpoint_bytes",
            "mfu",
            "mfu_peak_source",
            "padding_fraction",
        ):
            assert row[key] == s[key], key
        assert [row[f"train_loss_epoch_{e}"] for e in range(2)] == s[
            "train_loss_by_epoch"
        ]
        assert [
            row_of(data, "val_loss", precision, lora)[f"val_loss_epoch_{e}"]
            for e in range(2)
        ] == s["val_loss_by_epoch"]
        assert row["tokens_per_s"] > 0 and row["checkpoint_bytes"] > 0
    assert_table_shows(md, results, "tokens/s")
    assert_table_shows(md, data["tables"]["val_loss"], "val loss after epoch 0")


def test_missing_values_are_na_with_a_footnote_never_zero(report):
    _, md, data = report
    _, rows = md_table(md, "run", "peak GPU memory (MiB)")
    headers = [c["header"] for c in data["tables"]["results"]["columns"]]
    for cells in rows.values():
        mark = re.fullmatch(r"n/a\[\^(\d+)\]", cells[headers.index("peak GPU memory (MiB)")]).group(1)
        note = re.search(rf"^\[\^{mark}\]: (.*)$", md, re.M).group(1)
        assert note.startswith("CPU run")
        # a CPU run has an MFU, against a measured matmul peak, and says so
        assert re.fullmatch(r"\d+\.\d+%", cells[headers.index("MFU")]), cells
        assert cells[headers.index("MFU peak")] == "measured"


def test_ratios_against_the_matching_fp32_run(report, sweep_base):
    _, md, data = report
    s = summaries(sweep_base)
    for precision, lora in CELLS:
        row, run, base = (
            row_of(data, "vs_fp32", precision, lora),
            s[(precision, lora)],
            s[("fp32", lora)],
        )
        # the fp32 run with the same LoRA setting: only precision differs
        assert row["baseline"] == f"fp32 lora.enabled={str(lora).lower()}"
        assert row["tokens_per_s_speedup"] == run["tokens_per_s"] / base["tokens_per_s"]
        assert (
            row["epoch_time_speedup"]
            == base["mean_epoch_time_s"] / run["mean_epoch_time_s"]
        )
        assert (
            row["peak_host_rss_ratio"]
            == run["peak_host_rss_bytes"] / base["peak_host_rss_bytes"]
        )
        assert (
            row["checkpoint_ratio"]
            == run["checkpoint_bytes"] / base["checkpoint_bytes"]
        )
        assert row["peak_gpu_mem_ratio"] is None  # CPU runs: no GPU memory
        assert (
            row["final_train_loss_delta"]
            == run["train_loss_by_epoch"][-1] - base["train_loss_by_epoch"][-1]
        )
        if precision == "fp32":
            assert (
                row["tokens_per_s_speedup"] == 1.0
                and row["final_train_loss_delta"] == 0
            )
    assert_table_shows(md, data["tables"]["vs_fp32"], "tokens/s speedup")


def test_ablation_grid_has_one_row_per_cell(report, sweep_base):
    _, md, data = report
    table = data["tables"]["ablation"]
    assert [c["header"] for c in table["columns"]][1:5] == [
        "precision",
        "grad accum",
        "activation checkpointing",
        "LoRA",
    ]
    cells = {(r["precision"], r["lora.enabled"]) for r in table["rows"]}
    assert len(table["rows"]) == 4 and cells == set(CELLS)
    for (precision, lora), s in summaries(sweep_base).items():
        row = row_of(data, "ablation", precision, lora)
        assert (
            row["peak_memory_bytes"] == s["peak_host_rss_bytes"]
            and row["peak_memory_kind"] == "host peak RSS (CPU run)"
        )
        assert (
            row["mean_epoch_time_s"] == s["mean_epoch_time_s"]
            and row["trainable_params"] == s["trainable_params"]
        )
        assert (
            row["train.grad_accum"] == 2
            and row["parallel.activation_checkpointing"] is False
        )
        assert (row["adapter_bytes"] is not None) == lora
    assert_table_shows(md, table, "activation checkpointing")


def test_method_section_names_precision_mechanics_and_versions(report, sweep_base):
    _, md, _ = report
    method = md[md.index("## Method") :]
    env = summaries(sweep_base)[("fp32", False)]["environment"]
    assert "TF32 is switched off" in method  # fp32
    assert "torch.autocast(dtype=torch.bfloat16)" in method  # bf16
    assert "without loss scaling" in method
    assert "GradScaler` multiplies the loss" not in method  # no fp16 run, no fp16 text
    for text in (
        f"PyTorch {env['torch']}",
        f"transformers {env['transformers']}",
        f"numpy {env['numpy']}",
        f"Python {env['python']}",
        "**LoRA**",
        "rank 8",
        "`optim.lr` | peak learning rate (AdamW) | 0.002",
    ):
        assert text in method, text
    assert "differing only in `precision`, `lora.enabled`" in method


def test_every_referenced_png_is_a_valid_image(report):
    out, md, data = report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(images) == sorted(data["figures"]) and len(images) == 3
    for name in images:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(path)
        assert (
            pixels.ndim == 3
            and pixels.shape[0] > 200
            and pixels.shape[1] > 400
            and pixels.shape[2] in (3, 4)
        )
        assert pixels.std() > 0.01  # something was drawn


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("data_manifest_key", "0123456789abcdef", "data (data_manifest_key)"),
        ("params", 123, "model parameters"),
    ],
)
def test_runs_of_different_data_or_model_are_refused(
    capsys, sweep_base, tmp_path, key, value, named
):
    other = tmp_path / "other"
    shutil.copytree(
        cell_dir(sweep_base, "bf16", False),
        other,
        ignore=shutil.ignore_patterns("checkpoint*", "adapter"),
    )
    summary = json.loads((other / "summary.json").read_text())
    summary[key] = value
    (other / "summary.json").write_text(json.dumps(summary))
    fp32 = cell_dir(sweep_base, "fp32", False)
    code, _, err = run_cli(
        capsys, "report", str(fp32), str(other), "--out", str(tmp_path / "refused")
    )
    assert code == 2 and not (tmp_path / "refused").exists()
    (line,) = err.strip().splitlines()
    assert (
        line.startswith(f"error: runs differ in {named}: ")
        and f"{value} (other)" in line
        and fp32.name in line
    )
    code, _, err = run_cli(
        capsys,
        "report",
        str(fp32),
        str(other),
        "--out",
        str(tmp_path / "mixed"),
        "--allow-mixed",
    )
    assert code == 0, err
    md = (tmp_path / "mixed" / "report.md").read_text()
    assert "⚠ Mixed runs (--allow-mixed)" in md and md.count(" ⚠ |") >= 1


def test_out_dir_that_is_not_a_report_is_refused(capsys, sweep_base, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = run_cli(
        capsys, "report", str(sweep_base / "runs" / SWEEP_NAME), "--out", str(tmp_path)
    )
    assert (
        code == 2
        and "is not an earlier report" in err
        and (tmp_path / "keep.txt").exists()
    )


def test_an_earlier_report_is_replaced(capsys, report, sweep_base, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(report[0], out)
    (out / "stale.png").write_bytes(b"old")
    code, stdout, err = run_cli(
        capsys, "report", str(cell_dir(sweep_base, "fp32", False)), "--out", str(out)
    )
    assert code == 0, err
    assert f"wrote {out / 'report.md'}" in stdout, stdout
    assert (
        not (out / "stale.png").exists()
        and len(json.loads((out / "report.json").read_text())["runs"]) == 1
    )
    assert [p.name for p in tmp_path.iterdir()] == [
        "out"
    ]  # no temporary directory left behind


def test_int8_section_from_a_quant_summary(capsys, report, sweep_base, tmp_path):
    assert (
        "No run has a `quant_summary.json`" in report[1]
        and "int8" not in report[2]["tables"]
    )
    runs = tmp_path / "runs"
    shutil.copytree(sweep_base / "runs" / SWEEP_NAME, runs)
    fp32 = runs / cell_dir(sweep_base, "fp32", False).name
    code, _, err = run_cli(
        capsys,
        "quantize",
        "--checkpoint",
        str(fp32 / "checkpoint"),
        "--out",
        str(fp32 / "checkpoint_int8"),
        "--no-measure",
    )
    assert code == 0, err
    quant = json.loads((fp32 / "checkpoint_int8" / "quant_summary.json").read_text())
    code, _, err = run_cli(capsys, "report", str(runs), "--out", str(tmp_path / "out"))
    assert code == 0, err
    md, data = (
        (tmp_path / "out" / "report.md").read_text(),
        json.loads((tmp_path / "out" / "report.json").read_text()),
    )
    table = data["tables"]["int8"]
    (row,) = table["rows"]
    assert row["run"] == "fp32 lora.enabled=false" and row["method"] == quant["method"]
    assert (
        row["loss_fp32"] == quant["val"]["loss_fp32"]
        and row["loss_int8"] == quant["val"]["loss_int8"]
    )
    assert row["rel_loss_delta"] == quant["val"]["rel_loss_delta"]
    assert (
        row["file_int8"] == quant["file_bytes"]["int8"]
        and row["file_ratio"] == quant["file_bytes"]["ratio"]
    )
    assert row["gate"].startswith("passed")
    assert row["prefill_ms_int8"] is None  # --no-measure: no timings
    assert_table_shows(md, table, "val loss int8")
    assert "not measured (distrib-gpt quantize --no-measure" in md
    assert f"torchao {quant['torchao']} (int8)" in md
