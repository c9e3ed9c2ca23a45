"""Generation: the KV cache reproduces the full forward, seeded sampling, prompt rules, CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distrib_gpt.checkpoint import save_consolidated
from distrib_gpt.cli import main
from distrib_gpt.config import DataConfig
from distrib_gpt.data.templates import DOLLY_PROMPT, DOLLY_PROMPT_WITH_CONTEXT
from distrib_gpt.generate import (
    GenerationError,
    KVCache,
    build_prompt,
    encode_prompt,
    forward_cached,
    generate,
    sample_next,
)
from distrib_gpt.model import GPT, GPTConfig
from distrib_gpt.tokenizer import gpt2_encoding

ROOT = Path(__file__).resolve().parents[1]


def spread_model(seed: int = 0, **shape) -> GPT:
    """A small GPT whose logits are far apart (weights ~N(0, 0.3) instead of 0.02), so that
    greedy decoding has no near-ties that float rounding could flip."""
    torch.manual_seed(seed)
    cfg = {"block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}
    cfg.update(shape)
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return spread_model()


def test_cache_reproduces_the_full_forward(model):
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
    cache = KVCache.allocate(model, 2, 30, idx.device, torch.float32)
    torch.testing.assert_close(forward_cached(model, idx[:, :10], cache), full[:, 9], rtol=0, atol=1e-4)  # prefill
    torch.testing.assert_close(forward_cached(model, idx[:, 10:16], cache), full[:, 15], rtol=0, atol=1e-4)  # chunk (mask)
    for t in range(16, 24):  # one position at a time
        torch.testing.assert_close(forward_cached(model, idx[:, t : t + 1], cache), full[:, t], rtol=0, atol=1e-4)
    assert cache.length == 24
    with pytest.raises(GenerationError, match="cache holds 30"):
        forward_cached(model, idx[:, :7], cache)


def test_greedy_with_cache_equals_without(model):
    prompt = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, 30, temperature=0, stop_at_eot=False)
    plain = generate(model, prompt, 30, temperature=0, stop_at_eot=False, use_cache=False)
    assert cached.tokens == plain.tokens
    assert all(len(t) == 30 for t in cached.tokens)
    assert cached.decode_steps == 29 and cached.prefill_s > 0 and cached.decode_s > 0
    assert len(set(cached.tokens[0])) > 3  # not a degenerate constant sequence


def test_fixed_seed_gives_the_same_sample(model):
    prompt = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(3))
    kw = {"temperature": 1.0, "top_k": 100, "top_p": 0.9, "stop_at_eot": False}
    a = generate(model, prompt, 20, seed=7, **kw).tokens
    b = generate(model, prompt, 20, seed=7, **kw).tokens
    c = generate(model, prompt, 20, seed=8, **kw).tokens
    assert a == b
    assert a != c
    # the cache does not change what is sampled
    assert generate(model, prompt, 20, seed=7, use_cache=False, **kw).tokens == a


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 2, None, g).tolist()) <= {0, 1}
    assert set(sample_next(logits, 1.0, 1, None, g).tolist()) == {0}
    # probabilities ~ .64 .23 .09 .03 .01: top_p=0.8 keeps the first two, 0.5 only the first
    assert set(sample_next(logits, 1.0, None, 0.8, g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, None, 0.5, g).tolist()) == {0}
    assert sample_next(logits[:1], 0.0, None, None, None).item() == 0  # greedy


def test_stops_at_end_of_text(model):
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(4))
    free = generate(model, prompt, 12, temperature=0, stop_at_eot=False).tokens[0]
    stop = free[5]
    assert stop not in free[:5]
    r = generate(model, prompt, 12, temperature=0, eot_id=stop)  # pretend that token is end-of-text
    assert r.tokens[0] == free[:5] and r.stopped_at_eot == [True]
    assert r.decode_steps == 5


def test_prompt_rules():
    cfg = DataConfig()
    text = build_prompt(None, "Name a colour.", "Think of the sky.", cfg)
    assert text == DOLLY_PROMPT_WITH_CONTEXT.format(instruction="Name a colour.", context="Think of the sky.")
    assert build_prompt("raw text", None, None, cfg) == "raw text"
    for args, needle in (
        (("", None, None), "prompt is empty"),
        (("  \n", None, None), "prompt is empty"),
        ((None, " ", None), "instruction is empty"),
        ((None, None, None), "give --prompt"),
        (("a", "b", None), "not both"),
        (("a", None, "c"), "needs --instruction"),
    ):
        with pytest.raises(GenerationError, match=needle):
            build_prompt(*args, cfg)

    ids = gpt2_encoding().encode_ordinary("one two three four five six seven eight")
    assert encode_prompt("one two three four five six seven eight", 16, 8) == (ids, 0)
    with pytest.raises(GenerationError, match="8 tokens but the model's 12 positions leave room for 4"):
        encode_prompt("one two three four five six seven eight", 12, 8)
    assert encode_prompt("one two three four five six seven eight", 12, 8, "truncate") == (ids[-4:], 4)
    with pytest.raises(GenerationError, match="leaves no room"):
        encode_prompt("x", 12, 12)
    with pytest.raises(GenerationError, match="exceeds the model's 64 positions"):
        generate(spread_model(), torch.zeros(1, 60, dtype=torch.long), 5)


# ------------------------------------------------------------------------- the command


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "distrib_gpt", *args], check=False, capture_output=True, text=True, cwd=cwd)


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gen") / "checkpoint"
    save_consolidated(spread_model(block_size=128), d)
    return d


def test_cli_generate_is_reproducible(ckpt, tmp_path, capsys):
    args = ("generate", "--checkpoint", str(ckpt), "--instruction", "Say hi.", "--max-new-tokens", "12", "--seed", "5", "--stats")
    a = cli(*args, cwd=tmp_path)  # a fresh process ...
    assert a.returncode == 0, a.stderr
    assert main(list(args)) == 0  # ... and this one sample the same text with the same seed
    b = capsys.readouterr()
    assert a.stdout == b.out and a.stdout.strip()
    n = len(gpt2_encoding().encode_ordinary(DOLLY_PROMPT.format(instruction="Say hi.")))
    assert f"prompt {n} tokens" in a.stderr  # the training (Dolly) template around the instruction
    assert main([*args[:-2], "6"]) == 0 and capsys.readouterr().out != a.stdout  # another seed, another sample


def test_cli_generate_bad_inputs(ckpt, tmp_path, capsys):
    def in_process(*args, needles):
        assert main(list(args)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        for n in needles:
            assert n in lines[0], lines[0]

    in_process("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi", needles=("nope", "not found"))
    in_process("generate", "--checkpoint", str(ckpt), "--prompt", "", needles=("prompt is empty",))
    in_process("generate", "--checkpoint", str(ckpt), "--prompt", "hi", "--top-p", "0", needles=("top_p",))
    one_line_error(
        cli("generate", "--checkpoint", str(ckpt), "--prompt", "word " * 200, "--max-new-tokens", "8", cwd=tmp_path),
        "room for 120", "--overlong truncate",
    )
    # a checkpoint whose config.json claims another shape than its weights
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["n_embd"] = 64
    (other / "config.json").write_text(json.dumps(meta))
    in_process("generate", "--checkpoint", str(other), "--prompt", "hi", needles=("shape", "config.json implies"))
