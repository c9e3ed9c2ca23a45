"""The `distrib-gpt` command line: subcommands, one-line errors, exit codes, nothing half-written."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "distrib_gpt", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_subcommands(tmp_path):
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "prepare" in r.stdout and "train" in r.stdout
    r = cli("train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "section.key=value" in r.stdout


def test_prepare_writes_then_reuses(tmp_path):
    args = ("prepare", "--config", str(ROOT / "configs/quickstart.yaml"), "data.max_examples=50", f"data.cache_dir={tmp_path}/c")
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "data: wrote" in first.stdout and "data: train: " in first.stdout
    second = cli(*args, cwd=tmp_path)
    assert second.returncode == 0 and "data: reusing" in second.stdout and "train: examples=" in second.stdout


def test_bad_data_fails_in_one_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = '{"instruction": "a", "context": "", "response": "b", "category": "open_qa"}\n'
    bad.write_text(good * 3 + '{"instruction": "a", "context": "", "response": 7}\n')
    r = cli(
        "train", "--config", str(ROOT / "configs/quickstart.yaml"), f"data.source={bad}",
        f"data.cache_dir={tmp_path}/cache", f"run.out_dir={tmp_path}/runs", cwd=tmp_path,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{bad}:4" in lines[0] and "response" in lines[0]
    assert not (tmp_path / "runs").exists()  # no run directory from a failed start
    assert not any((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else True


def test_missing_config_file(tmp_path):
    r = cli("train", "--config", "nope.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "nope.yaml: config file not found" in r.stderr
