"""Document-masked packing, end to end: a packed example is scored exactly as if it were
alone (per token, on every CPU kernel), evaluation gives the same loss with `pack` and
`pad`, and `pack_concat` (cross-attending rows) is shown to differ, so the tests can fail.

CPU, fp32. The flex case compiles flex_attention once (seconds); forward only, since flex
has no backward on a CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distrib_gpt import cli
from distrib_gpt import train as T
from distrib_gpt.config import DataConfig, load_config
from distrib_gpt.data import BatchLoader, TokenizedSplit, prepare_data
from distrib_gpt.data.loader import PAD_DOC_ID
from distrib_gpt.model import GPT, GPTConfig
from distrib_gpt.precision import resolve_precision

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from tiny_run import tiny_run  # noqa: E402

SEQ = 64


@pytest.fixture(scope="module")
def val_split(tmp_path_factory) -> TokenizedSplit:
    """Dolly-schema records of uneven lengths: rows hold 1 to several examples."""
    tmp = tmp_path_factory.mktemp("packing")
    rows = [
        {"instruction": f"Name thing {i}.", "context": "Some context here." if i % 3 == 0 else "",
         "response": f"Thing {i}" + " and more" * (i % 7), "category": "open_qa"}
        for i in range(80)
    ]
    source = tmp / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = DataConfig(source=str(source), cache_dir=str(tmp / "cache"), seq_len=SEQ, val_fraction=0.5, template="none")
    return TokenizedSplit.open(prepare_data(cfg, log=lambda *a: None).dir, "val")


def small_gpt(attention: str = "auto") -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=SEQ, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, attention=attention)
    model = GPT(cfg).eval()
    with torch.no_grad():  # a position embedding far from zero: wrong positions must show
        model.transformer.wpe.weight.normal_(0, 0.5)
    return model


def per_example_errors(model: GPT, split: TokenizedSplit, batching: str) -> list[float]:
    """For every example: the largest difference between its per-token losses in a
    `batching` row and when it is run alone, unpadded, from position 0. Where each example
    sits is read from the `pack` batches' document ids (pack_concat has the same rows)."""
    masked = BatchLoader(split, "pack", SEQ, 4, seed=0, shuffle=False)
    tested = BatchLoader(split, batching, SEQ, 4, seed=0, shuffle=False)
    errors = []
    for m, b in zip(masked, tested, strict=True):
        logits = model(b.input_ids, doc_ids=b.doc_ids, position_ids=b.position_ids)
        losses = F.cross_entropy(logits.flatten(0, 1), b.labels.reshape(-1), reduction="none").view(b.labels.shape)
        for r in range(b.input_ids.shape[0]):
            for d in (m.doc_ids[r].unique()[m.doc_ids[r].unique() != PAD_DOC_ID]).tolist():
                where = (m.doc_ids[r] == d).nonzero().squeeze(1)  # its input positions in the row
                labels = b.labels[r, where]
                alone = model(b.input_ids[r, where][None])[0]  # the example's inputs alone, positions 0..
                ref = F.cross_entropy(alone, labels, reduction="none")
                sup = labels != -100
                assert sup.any()
                errors.append(float((losses[r, where][sup] - ref[sup]).abs().max()))
    return errors


@pytest.mark.parametrize("kernel", ["sdpa_mask", "flex"])
def test_every_packed_example_scores_as_if_alone(val_split, kernel):
    model = small_gpt(kernel)
    batches = list(BatchLoader(val_split, "pack", SEQ, 4, seed=0, shuffle=False))
    docs_per_row = [len(set(row.tolist()) - {PAD_DOC_ID}) for b in batches for row in b.doc_ids]
    assert max(docs_per_row) >= 3 and min(docs_per_row) >= 1
    with torch.no_grad():
        errors = per_example_errors(model, val_split, "pack")
    assert len(errors) == val_split.n_examples
    assert max(errors) < 1e-5, max(errors)


def test_cross_attending_pack_does_not(val_split):
    """The same comparison with `pack_concat` fails: examples after the first in a row
    see the ones before them and sit at later positions."""
    with torch.no_grad():
        errors = per_example_errors(small_gpt(), val_split, "pack_concat")
    assert len(errors) == val_split.n_examples
    firsts = sum(1 for b in BatchLoader(val_split, "pack", SEQ, 4, seed=0, shuffle=False) for _ in b.doc_ids)
    assert sum(e > 1e-3 for e in errors) == val_split.n_examples - firsts  # all but each row's first


def test_eval_loss_is_the_same_packed_and_padded(val_split):
    model = small_gpt()
    policy = resolve_precision("fp32", torch.device("cpu"))
    loss = {
        mode: T.evaluate(model, BatchLoader(val_split, mode, SEQ, 4, seed=0, shuffle=False), None, policy, torch.device("cpu"))
        for mode in ("pack", "pad", "pack_concat")
    }
    assert abs(loss["pack"] - loss["pad"]) <= 1e-5 * loss["pad"], loss
    assert abs(loss["pack_concat"] - loss["pad"]) > 1e-3 * loss["pad"], loss


def eval_run(tmp_path, *extra: str) -> list[str]:
    """The shared tiny run at seq_len 256 with 40 validation examples, so that packed rows
    hold several of them."""
    return tiny_run(tmp_path / "cache", tmp_path / "runs", "r", "model.block_size=256", "data.seq_len=256",
                    "data.max_examples=200", "data.val_fraction=0.2", "train.epochs=1",
                    "quantize.after_training=false", *extra)


def test_one_checkpoint_evaluates_the_same_with_pack_and_pad(tmp_path, capsys):
    """`distrib-gpt eval` of a trained checkpoint over the whole validation split."""
    T.train(load_config(None, eval_run(tmp_path, "train.max_steps=4")))
    ckpt = tmp_path / "runs" / "r" / "checkpoint"

    def eval_loss(batching: str, checkpoint=ckpt) -> float:
        capsys.readouterr()
        assert cli.main(["eval", "--checkpoint", str(checkpoint), "--json", f"data.batching={batching}",
                         "eval.val_batches=null"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]

    pack, pad, concat = eval_loss("pack"), eval_loss("pad"), eval_loss("pack_concat")  # 40 validation examples
    assert eval_loss("pad", checkpoint=ckpt.parent) == pad  # the run directory names its checkpoint/
    assert abs(pack - pad) <= 1e-5 * pad, (pack, pad)
    assert abs(concat - pad) > 1e-4 * pad, (concat, pad)
