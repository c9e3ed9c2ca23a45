"""The `distrib-gpt` command line: subcommands, one-line errors, exit codes, nothing half-written."""

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_overrides_anywhere_on_the_line(capsys):
    """Overrides before and after an option both apply, in command-line order (the later
    value of a key wins); a stray word that is not key=value is refused."""
    from distrib_gpt.cli import parse_args
    from distrib_gpt.config import load_config

    quickstart = str(ROOT / "configs/quickstart.yaml")
    args = parse_args(["train", "optim.lr=0.5", "data.seq_len=128", "--config", quickstart, "optim.lr=0.25", "train.epochs=7"])
    assert args.config == quickstart
    assert args.overrides == ["optim.lr=0.5", "data.seq_len=128", "optim.lr=0.25", "train.epochs=7"]
    cfg = load_config(args.config, args.overrides)
    assert (cfg.optim.lr, cfg.data.seq_len, cfg.train.epochs, cfg.model.n_layer) == (0.25, 128, 7, 4)
    args = parse_args(["eval", "data.batching=pad", "--checkpoint", "ck", "--json", "eval.val_batches=null"])
    assert args.checkpoint == "ck" and args.json and args.overrides == ["data.batching=pad", "eval.val_batches=null"]
    for argv, stray in ((["train", "optim.lr=0.1", "--config", quickstart, "stray"], "stray"),
                        (["train", "a=1", "--bogus"], "--bogus"),
                        (["export-hf", "--checkpoint", "c", "--out", "o", "a=1"], "a=1")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert f"unrecognized arguments: {stray}" in capsys.readouterr().err
