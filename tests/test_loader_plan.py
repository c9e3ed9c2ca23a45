"""The loader's plan-derived figures and the prefetcher: supervised counts per step from the
deterministic plan, the supervised-position index of a batch, and prefetching in order."""

from __future__ import annotations

import itertools
import json
import threading
import time
import traceback

import numpy as np
import pytest
import torch

from distrib_gpt.config import DataConfig
from distrib_gpt.data import BatchLoader, TokenizedSplit, prepare_data
from distrib_gpt.data.loader import Batch, Prefetcher
from distrib_gpt.model import GPT, GPTConfig

# (batching, seq_len, batch_size): with the split below each gives a global batch count that
# is a multiple of neither 2 nor 3, so 2 and 3 ranks pad the list with repeats.
LAYOUTS = [("pack", 64, 4), ("pack_concat", 64, 1), ("pad", 64, 3), ("pad", 64, 5)]


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> TokenizedSplit:
    tmp = tmp_path_factory.mktemp("plan")
    rows = [
        {"instruction": f"Question {i}: what is item {i}?", "response": f"Answer {i}." + " more" * (4 * (i % 4))}
        for i in range(61)
    ]
    source = tmp / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = DataConfig(source=str(source), cache_dir=str(tmp / "cache"), seq_len=64, val_fraction=0.1, template="none", shard_tokens=300)
    prepared = prepare_data(cfg, log=lambda *a: None)
    assert len(prepared.manifest["splits"]["train"]["shards"]) > 3  # spans cross shard boundaries
    return TokenizedSplit.open(prepared.dir, "train")


def loader(split: TokenizedSplit, layout, **kw) -> BatchLoader:
    batching, seq_len, batch_size = layout
    return BatchLoader(split, batching, seq_len, batch_size, seed=7, **kw)


def built_step_counts(split: TokenizedSplit, layout, world_size: int, grad_accum: int, epoch: int) -> list[int]:
    """N_global of each step the slow way: build every rank's batches and count labels."""
    per_rank = []
    for rank in range(world_size):
        ld = loader(split, layout, rank=rank, world_size=world_size)
        ld.set_epoch(epoch)
        per_rank.append([int((b.labels != -100).sum()) for b in ld])
    n = len(per_rank[0])
    return [sum(c for counts in per_rank for c in counts[s : s + grad_accum]) for s in range(0, n, grad_accum)]


# ------------------------------------------------------------------------------ supervised counts


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "-".join(map(str, x)))
def test_global_batch_counts_match_built_batches(split, layout):
    ld = loader(split, layout)
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        built = [int((b.labels != -100).sum()) for b in ld]
        assert ld.global_batch_supervised().tolist() == built
    assert int(ld.global_batch_supervised().sum()) == split.n_supervised  # an epoch trains on each once


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("grad_accum", [1, 3])
def test_step_counts_match_built_batches(split, layout, world_size, grad_accum):
    assert loader(split, layout).global_batches() % 6 not in (0, 2, 3, 4)  # not a multiple of 2 or 3
    for epoch in (0, 1):
        expected = built_step_counts(split, layout, world_size, grad_accum, epoch)
        for rank in range(world_size):  # every rank plans the same N_global for every step
            ld = loader(split, layout, rank=rank, world_size=world_size)
            ld.set_epoch(epoch)
            got = ld.step_supervised_counts(grad_accum)
            assert got.dtype == np.int64 and got.tolist() == expected
            assert len(got) == -(-len(ld) // grad_accum)


def test_step_counts_of_an_empty_epoch(split):
    ld = loader(split, ("pack", 64, 4))
    with pytest.raises(ValueError):
        ld.step_supervised_counts(0)
    empty = TokenizedSplit("train", [])
    assert BatchLoader(empty, "pack", 64, 4, seed=0).step_supervised_counts(2).tolist() == []


def test_example_supervised(split):
    expected = [int(np.count_nonzero(split.example(i)[1])) for i in range(split.n_examples)]
    assert split.example_supervised.tolist() == expected


# ------------------------------------------------------------------------------ target index


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "-".join(map(str, x)))
def test_batches_carry_their_supervised_positions(split, layout):
    for b in loader(split, layout):
        assert b.target_index.dtype == torch.int64
        assert torch.equal(b.target_index, (b.labels.reshape(-1) != -100).nonzero().squeeze(1))
        assert len(b.target_index) == b.n_supervised
        assert torch.equal(b.to("cpu").target_index, b.target_index)


@pytest.mark.parametrize("batching", ["pack", "pack_concat", "pad"])
def test_forward_with_target_index_is_bit_identical(split, batching):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    batch = next(iter(loader(split, (batching, 64, 3))))

    def loss_and_grads(**kw):
        model.zero_grad(set_to_none=True)
        _, loss = model(batch.input_ids, batch.labels, reduction="sum", return_logits=False,
                        doc_ids=batch.doc_ids, position_ids=batch.position_ids, **kw)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_grads()
    loss_b, grads_b = loss_and_grads(target_index=batch.target_index)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


# ------------------------------------------------------------------------------ prefetcher


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def same(a: Batch, b: Batch) -> bool:
    return (
        torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.target_index, b.target_index)
        and (a.n_real_tokens, a.n_supervised, a.n_pad) == (b.n_real_tokens, b.n_supervised, b.n_pad)
    )


@pytest.mark.parametrize("layout", LAYOUTS[:1] + LAYOUTS[2:3], ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_prefetcher_keeps_the_order(split, layout, depth):
    ld = loader(split, layout, rank=1, world_size=2)
    plain = list(ld.iter_from(1))
    fetched = Prefetcher(ld, "cpu", depth=depth)
    assert all(same(a, b) for a, b in zip(list(fetched), list(ld))) and len(list(fetched)) == len(ld)
    got = list(Prefetcher(ld.iter_from(1), "cpu", depth=depth))  # resuming mid-epoch
    assert len(got) == len(plain) > 0 and all(same(a, b) for a, b in zip(got, plain))
    assert wait_until(lambda: not prefetch_threads())


def test_prefetcher_reraises_a_build_error_with_its_traceback(split):
    batches = list(loader(split, ("pack", 64, 4)))

    def failing_source():
        yield from batches[:3]
        raise RuntimeError("shard went missing")

    got = []
    with pytest.raises(RuntimeError, match="shard went missing") as exc:
        for b in Prefetcher(failing_source(), "cpu", depth=2):
            got.append(b)
    assert len(got) == 3 and all(same(a, b) for a, b in zip(got, batches))
    frames = [f.name for f in traceback.extract_tb(exc.value.__traceback__)]
    assert "failing_source" in frames  # the producer's frames, not just the consumer's
    assert wait_until(lambda: not prefetch_threads())


@pytest.mark.parametrize("how", ["break", "close"])
def test_prefetcher_stops_its_thread_when_the_consumer_stops(split, how):
    batches = list(loader(split, ("pad", 64, 3)))
    built: list[int] = []

    def endless():  # would fill any queue: the producer must notice that nobody reads
        for i, b in enumerate(itertools.cycle(batches)):
            built.append(i)
            yield b

    depth = 2
    it = iter(Prefetcher(endless(), "cpu", depth=depth))
    first = next(it)
    assert same(first, batches[0])
    # bounded: one handed out, one copied ahead, `depth` queued and one waiting to be queued
    assert wait_until(lambda: len(built) >= depth + 3)
    time.sleep(0.1)
    assert len(built) == depth + 3 and len(prefetch_threads()) == 1
    if how == "close":
        it.close()
    else:
        for _ in it:
            break
        del it  # as when a loop over it is left: the generator is collected and closed
    assert wait_until(lambda: not prefetch_threads())


def test_prefetcher_rejects_a_negative_depth():
    with pytest.raises(ValueError):
        Prefetcher([], "cpu", depth=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetcher_on_cuda(split):
    ld = loader(split, ("pack", 64, 4))
    plain = list(ld)
    got = list(Prefetcher(ld, "cuda", depth=2))
    assert all(b.input_ids.is_cuda and b.labels.is_cuda and b.target_index.is_cuda for b in got)
    assert len(got) == len(plain) and all(same(a.to("cpu"), b) for a, b in zip(got, plain))
