import json

import pytest
import torch

from distrib_gpt.checkpoint import CheckpointError, load_consolidated, save_consolidated
from distrib_gpt.model import GPT, GPTConfig


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=300, pad_vocab_to=64)).eval()


def test_round_trip_same_logits_and_tied(model, tmp_path):
    out = save_consolidated(model, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    loaded = load_consolidated(out).eval()
    x = torch.randint(0, 300, (2, 16))
    assert torch.equal(model(x), loaded(x))
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_export_dtype_halves_size(model, tmp_path):
    a = save_consolidated(model, tmp_path / "a", "fp32") / "model.safetensors"
    b = save_consolidated(model, tmp_path / "b", "bf16") / "model.safetensors"
    assert 0.45 < b.stat().st_size / a.stat().st_size < 0.55
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bf16"
    loaded = load_consolidated(tmp_path / "b")
    assert loaded.transformer.wte.weight.dtype == torch.float32


def test_truncated_file_names_the_file(model, tmp_path):
    out = save_consolidated(model, tmp_path / "ckpt")
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_consolidated(out)


def test_shape_mismatch_names_the_key(model, tmp_path):
    out = save_consolidated(model, tmp_path / "ckpt")
    meta = json.loads((out / "config.json").read_text())
    meta["model"]["n_embd"] = 64
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"has shape"):
        load_consolidated(out)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_consolidated(tmp_path / "nope")
