import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distrib_gpt.config import Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    names = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert {"quickstart.yaml", "gpt2_dolly_fp32.yaml", "gpt2_dolly_tf32.yaml", "gpt2_dolly_fp16.yaml", "gpt2_dolly_bf16.yaml"} <= set(names)
    for name in names:
        cfg = load_config(ROOT / "configs" / name)
        assert isinstance(cfg, Config)
    for p in ("fp32", "tf32", "fp16", "bf16"):
        cfg = load_config(ROOT / "configs" / f"gpt2_dolly_{p}.yaml")
        assert cfg.precision == p
        assert cfg.model.name == "gpt2" and cfg.model.init == "pretrained"
        assert cfg.data.source == "databricks/databricks-dolly-15k" and cfg.data.seq_len == 1024


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "train.epochs=5", "data.train_on_prompt=true", "optim.betas=[0.8,0.9]", "precision=bf16"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 5
    assert cfg.data.train_on_prompt is True
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.precision == "bf16"


def test_override_parsing_keeps_strings():
    assert parse_overrides(["data.source=./x.jsonl", "run.name=abc"]) == [("data.source", "./x.jsonl"), ("run.name", "abc")]


@pytest.mark.parametrize(
    "override, needle",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["optimizer.lr=1"], "optimizer"),
        (["train.epochs=three"], "train.epochs"),
        (["train.epochs=0"], "train.epochs"),
        (["train.micro_batch_size=1.5"], "train.micro_batch_size"),
        (["precision=fp8"], "precision"),
        (["data.seq_len=4096"], "data.seq_len"),
        (["data.val_fraction=1.5"], "data.val_fraction"),
        (["optim.lr=-1"], "optim.lr"),
        (["model.dropout=1.0"], "model.dropout"),
        (["model.n_layer=3"], "model.n_layer"),  # shape change on a pretrained model
        (["data.train_on_prompt=maybe"], "data.train_on_prompt"),
        (["model.name=custom", "model.init=scratch", "model.n_layer=2", "model.n_head=3", "model.n_embd=64"], "model.n_embd"),
        (["noequals"], "noequals"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=1"])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown\.yaml: unknown config key 'train.epoch'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["optim.lr=1e-3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg and again.hash() == cfg.hash()
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == pytest.approx(1e-3)


def test_cli_config_error_exits_2_with_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "distrib_gpt", "train", "--config", str(ROOT / "configs/quickstart.yaml"), "optim.lrr=1", f"run.out_dir={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"]
    assert not any(tmp_path.iterdir())  # nothing written before the config was valid


def test_bare_on_off_reach_string_choices():
    """YAML 1.1 reads `off` as False; a key whose choices are "on"/"off" still gets the word."""
    assert load_config(None, ["optim.fused=off"]).optim.fused == "off"
    assert load_config(None, ["optim.fused=on"]).optim.fused == "on"
    with pytest.raises(ConfigError, match="train.progress"):
        load_config(None, ["train.progress=maybe"])
