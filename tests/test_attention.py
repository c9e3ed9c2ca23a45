"""Tests for document-masked attention (distrib_gpt.attention, GPT.forward doc_ids/position_ids).

CPU, fp32. The flex tests compile flex_attention with inductor once per process (a few
seconds to tens of seconds); they run forward only, since flex has no backward on a CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distrib_gpt.attention import document_mask, resolve_backend
from distrib_gpt.model import GPT, GPTConfig

VOCAB = 1000
T = 48


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=64)
    base.update(kw)
    return GPT(GPTConfig(**base)).eval()


def packed_row(lengths: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, document ids and restarted positions of one row (1, T): documents of
    `lengths` end to end, then `pad` padding tokens with a document id of their own."""
    docs = [torch.full((n,), d) for d, n in enumerate(lengths)] + [torch.full((pad,), len(lengths))]
    doc_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(pad)])[None]
    idx = torch.randint(0, VOCAB, doc_ids.shape)
    return idx, doc_ids, position_ids


def packed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of uneven documents; the second ends in padding. T = 48."""
    torch.manual_seed(1)
    rows = [packed_row([5, 17, 1, 25], pad=0), packed_row([30, 9], pad=9)]
    return tuple(torch.cat(parts) for parts in zip(*rows))


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The forward pass as it was before doc_ids existed: positions 0..T-1, is_causal SDPA."""
    t, C, H = model.transformer, model.config.n_embd, model.config.n_head
    B, T_ = idx.shape
    x = t.wte(idx) + t.wpe(torch.arange(T_))
    for block in t.h:
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T_, H, C // H).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + block.attn.c_proj(y.transpose(1, 2).contiguous().view(B, T_, C))
        x = x + block.mlp(block.ln_2(x))
    return model._logits(t.ln_f(x))[..., :VOCAB]


def test_no_doc_ids_is_bit_identical_to_plain_causal():
    model = tiny_model()
    idx, _, _ = packed_batch()
    with torch.no_grad():
        expected = reference_forward(model, idx)
        assert torch.equal(model(idx), expected)
        # explicit positions 0..T-1, per row, take the same path through wpe
        assert torch.equal(model(idx, position_ids=torch.arange(T).expand(2, T)), expected)


def test_each_document_sees_only_itself():
    """[A | B | pad] with doc ids and restarted positions: A and B as if run alone."""
    model = tiny_model(attention="sdpa_mask")
    torch.manual_seed(2)
    a, b = torch.randint(0, VOCAB, (1, 20)), torch.randint(0, VOCAB, (1, 15))
    pad = torch.zeros(1, 5, dtype=torch.long)
    idx = torch.cat([a, b, pad], dim=1)
    doc_ids = torch.tensor([[0] * 20 + [1] * 15 + [2] * 5])
    position_ids = torch.cat([torch.arange(20), torch.arange(15), torch.arange(5)])[None]
    with torch.no_grad():
        packed = model(idx, doc_ids=doc_ids, position_ids=position_ids)
        torch.testing.assert_close(packed[:, :20], model(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(packed[:, 20:35], model(b), rtol=0, atol=1e-5)
        # the old behaviour: B attends to A, so its logits differ (this test can fail)
        old = model(idx, position_ids=position_ids)
        assert (old[:, 20:35] - model(b)).abs().max() > 1e-2
        torch.testing.assert_close(old[:, :20], model(a), rtol=0, atol=1e-5)  # A comes first either way


def test_sdpa_mask_matches_explicit_mask():
    """The boolean mask is causal & same-document, and a padded row keeps finite logits."""
    _, doc_ids, _ = packed_batch()
    mask = document_mask(doc_ids, "sdpa_mask").mask
    assert mask.shape == (2, 1, T, T)
    for b in range(2):
        for q in range(T):
            for k in range(T):
                assert mask[b, 0, q, k] == (k <= q and doc_ids[b, q] == doc_ids[b, k])
    model = tiny_model(attention="sdpa_mask")
    idx, doc_ids, position_ids = packed_batch()
    with torch.no_grad():
        assert torch.isfinite(model(idx, doc_ids=doc_ids, position_ids=position_ids)).all()


def test_loss_paths_with_doc_ids():
    """reduction="sum", return_logits=False and target_index with doc_ids: the same
    loss as the full logits give, and gradients reach the weights."""
    model = tiny_model(attention="sdpa_mask")
    idx, doc_ids, position_ids = packed_batch()
    targets = torch.roll(idx, -1, dims=1)
    targets[:, ::3] = -100  # some ignored positions, as prompt masking makes them
    kw = dict(doc_ids=doc_ids, position_ids=position_ids)
    with torch.no_grad():
        logits = model(idx, **kw)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-100, reduction="sum")
    full_logits, full_loss = model(idx, targets, reduction="sum", **kw)
    torch.testing.assert_close(full_logits, logits)
    torch.testing.assert_close(full_loss, expected)
    target_index = (targets != -100).reshape(-1).nonzero().squeeze(1)
    none, loss = model(idx, targets, reduction="sum", return_logits=False, target_index=target_index, **kw)
    assert none is None
    torch.testing.assert_close(loss, expected)
    _, mean_loss = model(idx, targets, return_logits=False, **kw)
    torch.testing.assert_close(mean_loss, expected / target_index.numel())
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_activation_checkpointing_with_doc_ids():
    model = tiny_model(attention="sdpa_mask").train()
    idx, doc_ids, position_ids = packed_batch()
    kw = dict(doc_ids=doc_ids, position_ids=position_ids)
    _, loss = model(idx, idx, **kw)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    _, loss_ckpt = model(idx, idx, **kw)
    loss_ckpt.backward()
    assert torch.equal(loss, loss_ckpt)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_shape_and_config_errors():
    model = tiny_model()
    idx, doc_ids, _ = packed_batch()
    with pytest.raises(ValueError, match="doc_ids must have shape"):
        model(idx, doc_ids=doc_ids[:, :-1])
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(idx, position_ids=torch.arange(T))
    with pytest.raises(ValueError, match="GPTConfig.attention"):
        GPTConfig(attention="varlen")
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa_mask"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("auto", torch.device("cuda"), dropout_p=0.1) == "sdpa_mask"
    with pytest.raises(ValueError, match="no dropout"):
        resolve_backend("flex", cpu, dropout_p=0.1)
    with pytest.raises(ValueError, match="no backward on a CPU"):
        resolve_backend("flex", cpu)  # grad mode is on here
    with torch.no_grad():
        assert resolve_backend("flex", cpu) == "flex"


def test_old_config_json_loads_with_default_attention():
    """Checkpoints store GPTConfig fields; ones written before `attention` existed still load."""
    old = dict(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=64, dropout=0.0,
               bias=True, layer_norm_eps=1e-5, pad_vocab_to=64)
    assert GPTConfig(**old).attention == "auto"


def test_flex_matches_sdpa_mask():
    """Logits of flex vs the dense-mask reference: uneven documents, padding at the end."""
    idx, doc_ids, position_ids = packed_batch()
    kw = dict(doc_ids=doc_ids, position_ids=position_ids)
    with torch.no_grad():
        reference = tiny_model(attention="sdpa_mask")(idx, **kw)
        flex = tiny_model(attention="flex")(idx, **kw)
    torch.testing.assert_close(flex, reference, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex has no backward on a CPU")
def test_flex_gradients_match_sdpa_mask():
    idx, doc_ids, position_ids = (t.cuda() for t in packed_batch())
    grads = {}
    for backend in ("sdpa_mask", "flex"):
        model = tiny_model(attention=backend).cuda()
        _, loss = model(idx, torch.roll(idx, -1, dims=1), doc_ids=doc_ids, position_ids=position_ids)
        loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["sdpa_mask"].items():
        torch.testing.assert_close(grads["flex"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_gradients_equal_separate_documents():
    """The gradient of a packed row's summed loss is the sum of its documents' gradients
    run alone: no gradient leaks across the document boundary (what flex must match too)."""
    model = tiny_model(attention="sdpa_mask")
    torch.manual_seed(3)
    a, b = torch.randint(0, VOCAB, (1, 20)), torch.randint(0, VOCAB, (1, 15))
    ta, tb = torch.randint(0, VOCAB, (1, 20)), torch.randint(0, VOCAB, (1, 15))
    idx, targets = torch.cat([a, b], dim=1), torch.cat([ta, tb], dim=1)
    doc_ids = torch.tensor([[0] * 20 + [1] * 15])
    position_ids = torch.cat([torch.arange(20), torch.arange(15)])[None]
    _, loss = model(idx, targets, reduction="sum", doc_ids=doc_ids, position_ids=position_ids)
    loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (model(a, ta, reduction="sum")[1] + model(b, tb, reduction="sum")[1]).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
