"""Tests for distrib_gpt.model (CPU, no network)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distrib_gpt.model import GPT, GPT_SHAPES, GPTConfig

import transformers  # a hard dependency: a broken install must fail these tests, not skip them

VOCAB = 1000  # not a multiple of 64, so pad_vocab_to=64 really pads (-> 1024)


def tiny_config(**kw) -> GPTConfig:
    base = dict(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=64, pad_vocab_to=64)
    base.update(kw)
    return GPTConfig(**base)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random HF GPT-2 saved to disk, and the in-memory HF model."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=64,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    # HF's default init (std 0.02, zero biases) keeps activations so small that
    # e.g. erf-GELU vs tanh-GELU would not show in the logits. Randomize every
    # parameter at a larger scale so that parity checks each piece of the math.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(str(path))
    return path, hf


# --------------------------------------------------------------------------- config


def test_padded_vocab_size():
    assert GPTConfig(vocab_size=50257, pad_vocab_to=64).padded_vocab_size == 50304
    assert GPTConfig(vocab_size=50257, pad_vocab_to=1).padded_vocab_size == 50257
    assert GPTConfig(vocab_size=50257, pad_vocab_to=0).padded_vocab_size == 50257
    assert GPTConfig(vocab_size=128, pad_vocab_to=64).padded_vocab_size == 128


def test_from_name():
    for name, (n_layer, n_head, n_embd) in GPT_SHAPES.items():
        cfg = GPTConfig.from_name(name, dropout=0.1)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (n_layer, n_head, n_embd)
        assert cfg.dropout == 0.1
    assert GPT_SHAPES["gpt2-xl"] == (48, 25, 1600)
    small = GPTConfig.from_name("gpt2", n_layer=2, block_size=128)
    assert (small.n_layer, small.n_head, small.block_size) == (2, 12, 128)
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.from_name("gpt3")


def test_bad_config_names_fields():
    with pytest.raises(ValueError, match=r"n_embd.*n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=-0.1)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=10.5)


# --------------------------------------------------------------------------- structure


def test_weights_tied_after_construction():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.transformer.wte.weight.shape == (1024, 64)
    # Pad rows start at zero.
    assert torch.all(model.transformer.wte.weight[VOCAB:] == 0)


def gpt2_param_formula(vocab_rows: int, block_size: int = 1024, n_layer: int = 12, d: int = 768) -> int:
    ln = 2 * d
    attn = (d * 3 * d + 3 * d) + (d * d + d)
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    block = 2 * ln + attn + mlp
    return vocab_rows * d + block_size * d + n_layer * block + ln


def test_num_params_gpt2():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2", pad_vocab_to=1))
    assert model.num_params() == 124_439_808
    assert model.num_params() == gpt2_param_formula(50257)
    assert model.num_params(exclude_embeddings=True) == 124_439_808 - 1024 * 768

    with torch.device("meta"):
        padded = GPT(GPTConfig.from_name("gpt2"))
    assert padded.config.padded_vocab_size == 50304
    assert padded.num_params() == gpt2_param_formula(50304)
    assert padded.num_params() - model.num_params() == (50304 - 50257) * 768


def test_init_statistics():
    # Large enough that the sample std of each matrix is tight (>= 100k samples).
    cfg = GPTConfig(block_size=256, vocab_size=4096, n_layer=8, n_head=8, n_embd=512, pad_vocab_to=1)
    torch.manual_seed(0)
    model = GPT(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    checked_resid = 0
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.1), name
            checked_resid += 1
        elif name.endswith(".weight") and ("wte" in name or "wpe" in name or "c_attn" in name or "c_fc" in name):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
            assert abs(p.mean().item()) < 0.002, name
        elif name.endswith(".bias"):  # Linear and LayerNorm biases
            assert torch.all(p == 0), name
        elif "ln_" in name:  # LayerNorm weights keep their default of 1
            assert torch.all(p == 1), name
    assert checked_resid == 2 * cfg.n_layer


# --------------------------------------------------------------------------- forward / loss


def test_logits_shape_is_true_vocab():
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, VOCAB, (3, 7))
    logits = model(idx)
    assert logits.shape == (3, 7, VOCAB)
    assert model.lm_head.weight.shape[0] == 1024


def test_sequence_too_long_raises():
    model = GPT(tiny_config(block_size=8))
    idx = torch.zeros(1, 9, dtype=torch.long)
    with pytest.raises(ValueError, match=r"(?=.*block_size)(?=.*9)(?=.*8)"):
        model(idx)
    model(idx[:, :8])  # exactly block_size is fine


def test_loss_sum_equals_mean_times_count():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, VOCAB, (2, 16))
    targets = torch.randint(0, VOCAB, (2, 16))
    targets[0, :5] = -100
    targets[1, 10:] = -100
    n = int((targets != -100).sum())
    logits, mean = model(idx, targets)
    _, total = model(idx, targets, reduction="sum")
    assert mean.dtype == torch.float32
    assert total.item() == pytest.approx(mean.item() * n, rel=1e-5)
    # Reference: plain CE over the non-ignored positions only.
    mask = targets != -100
    ref = F.cross_entropy(logits[mask], targets[mask])
    assert mean.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        model(idx, targets, reduction="none")


def test_ignored_targets_do_not_count():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, VOCAB, (1, 10))
    targets = torch.full((1, 10), -100)
    targets[0, 6] = 42
    logits, loss = model(idx, targets)
    single = F.cross_entropy(logits[0, 6].unsqueeze(0), torch.tensor([42]))
    assert loss.item() == pytest.approx(single.item(), rel=1e-6)
    # With one supervised token, "sum" and "mean" agree.
    _, loss_sum = model(idx, targets, reduction="sum")
    assert loss_sum.item() == pytest.approx(single.item(), rel=1e-6)
    # Changing the input after position 6 changes logits there, but (causal
    # attention) not at 6, and those positions are ignored: loss unchanged.
    idx2 = idx.clone()
    idx2[0, 7:] = (idx2[0, 7:] + 1) % VOCAB
    logits2, loss2 = model(idx2, targets)
    assert not torch.allclose(logits2[0, 7:], logits[0, 7:])
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)


def test_pad_columns_never_enter_softmax():
    # Mimic pretrained GPT-2, whose logits are all large negatives: make every
    # real logit about -10 while the zero pad rows give logits of exactly 0.
    # If pad columns reached the softmax they would take almost all the mass
    # and the loss would be about 10 + log(24) instead of about log(VOCAB).
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    u = F.normalize(torch.randn(64), dim=0)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(-10 * u)
        model.transformer.wte.weight[:VOCAB] = u + 0.01 * torch.randn(VOCAB, 64)
    idx = torch.randint(0, VOCAB, (1, 8))
    targets = torch.randint(0, VOCAB, (1, 8))
    logits, loss = model(idx, targets)
    assert logits.shape[-1] == VOCAB
    assert logits.max().item() < -9
    assert abs(loss.item() - math.log(VOCAB)) < 0.5


def test_backward_reaches_wte_through_embedding_and_head():
    torch.manual_seed(0)
    model = GPT(tiny_config()).train()
    idx = torch.randint(0, 100, (2, 8))  # only tokens < 100 are looked up
    targets = torch.randint(0, VOCAB, (2, 8))
    _, loss = model(idx, targets)
    loss.backward()
    g = model.transformer.wte.weight.grad
    assert g is not None and model.lm_head.weight.grad is g
    # Rows >= 100 are never looked up: their gradient comes only from the head.
    assert g[100:VOCAB].abs().sum() > 0
    # Pad rows get no gradient at all (their logits are sliced off).
    assert torch.all(g[VOCAB:] == 0)
    # Looked-up rows get gradient from the embedding too: compare with the
    # head-only gradient obtained by detaching the embedding lookup.
    model.zero_grad()
    wte = model.transformer.wte
    with torch.no_grad():
        emb = wte(idx)
    x = model.transformer.drop(emb + model.transformer.wpe(torch.arange(8)))
    for block in model.transformer.h:
        x = block(x)
    head_only_logits = model.lm_head(model.transformer.ln_f(x))[..., :VOCAB]
    F.cross_entropy(head_only_logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
    g_head = wte.weight.grad
    looked_up = torch.unique(idx)
    assert not torch.allclose(g[looked_up], g_head[looked_up])
    for name, p in model.named_parameters():
        assert p.grad is not None, name


# --------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("pad_vocab_to", [64, 1])
def test_hf_parity(hf_checkpoint, pad_vocab_to):
    path, hf = hf_checkpoint
    model = GPT.from_pretrained(str(path), pad_vocab_to=pad_vocab_to).eval()
    expected_rows = 1024 if pad_vocab_to == 64 else VOCAB
    assert model.transformer.wte.weight.shape == (expected_rows, 64)
    assert model.config.block_size == 64 and model.config.vocab_size == VOCAB
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.all(model.transformer.wte.weight[VOCAB:] == 0)

    torch.manual_seed(0)
    idx = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)
        logits, loss = model(idx, targets)
    assert logits.shape == ref.logits.shape
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    # HF shifts labels internally; our targets are pre-shifted with -100 at the end.
    assert loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)
    # Sanity: the weights are not trivially identical to a fresh init.
    assert not torch.allclose(logits, GPT(model.config).eval()(idx), atol=1e-3)


def test_from_pretrained_overrides(hf_checkpoint):
    path, _ = hf_checkpoint
    model = GPT.from_pretrained(str(path), dropout=0.2)
    assert model.config.dropout == 0.2
    with pytest.raises(ValueError, match="n_layer"):
        GPT.from_pretrained(str(path), n_layer=4)
    with pytest.raises(ValueError, match="block_size"):
        GPT.from_pretrained(str(path), block_size=16)
    with pytest.raises(ValueError, match="bogus"):
        GPT.from_pretrained(str(path), bogus=1)


def test_from_pretrained_refuses_other_activation(tmp_path):
    cfg = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=50, bos_token_id=0, eos_token_id=0,
        activation_function="relu",
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="relu"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_refuses_other_model_type(tmp_path):
    transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
    ).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="llama"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises((ValueError, FileNotFoundError), match="no_such_checkpoint"):
        GPT.from_pretrained(str(missing))
    # An existing directory without a checkpoint in it also names the path.
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match="empty_dir"):
        GPT.from_pretrained(str(empty))


def test_loss_without_logits_matches_full_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300, pad_vocab_to=64))
    idx = torch.randint(0, 300, (3, 16))
    targets = torch.randint(0, 300, (3, 16))
    targets[:, :9] = -100  # a masked prompt
    for reduction in ("mean", "sum"):
        logits, full = model(idx, targets, reduction=reduction)
        none, fast = model(idx, targets, reduction=reduction, return_logits=False)
        assert none is None and logits.shape == (3, 16, 300)
        torch.testing.assert_close(fast, full)
    g_full = torch.autograd.grad(model(idx, targets, reduction="sum")[1], model.transformer.wte.weight)[0]
    g_fast = torch.autograd.grad(model(idx, targets, reduction="sum", return_logits=False)[1], model.transformer.wte.weight)[0]
    torch.testing.assert_close(g_fast, g_full)
