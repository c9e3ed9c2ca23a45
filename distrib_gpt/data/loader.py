"""Batches from prepared shards: memory-mapped, deterministic, rank-aware.

Two ways to turn examples into (B, T) batches:

- `pack` (nanoGPT style): each epoch the examples (each ending in EOT) are laid end to end
  in a stream, in an order shuffled by (seed, epoch); the stream is cut into blocks of
  seq_len + 1 tokens with stride seq_len, so x = block[:-1], y = block[1:] and every stream
  position after the first is a target exactly once. Only the final block is partial; it
  is padded, so no supervised token is lost. No compute goes to padding, but a row's
  context may include the end of the previous example (it is separated by EOT).
- `pad`: one example per row, padded to the longest in its batch. Examples are shuffled,
  cut into chunks of batch_size * 50, each chunk sorted by length and cut into batches
  (length bucketing keeps padding low), then the batch order is shuffled.

Labels are -100 (ignored by cross-entropy) where the target token is not supervised (its
mask is 0) or is padding; padding uses EOT as the input id. Because token 0 of an example
is never supervised (see prepare.py), both modes supervise exactly the same tokens.

Distributed: the epoch's global batch list is a pure function of (data, seed, epoch), the
same on every rank. Rank r takes batches r, r + world_size, r + 2 * world_size, ... When
the count is not a multiple of world_size, the list is padded by repeating batches from
its start (as torch's DistributedSampler does), so every rank runs the same number of
steps; those few repeated batches are seen twice in that epoch.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from distrib_gpt.tokenizer import EOT_ID

IGNORE_INDEX = -100
PAD_BUCKET_BATCHES = 50  # pad mode sorts by length within chunks of batch_size * 50 examples


class TokenizedSplit:
    """One split of a prepared directory: shards memory-mapped, examples indexed globally."""

    def __init__(self, name: str, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.name = name
        self._tokens = [t for t, _, _ in shards]
        self._masks = [m for _, m, _ in shards]
        per_shard = [np.diff(np.asarray(o, dtype=np.int64)) for _, _, o in shards]
        self.lengths: np.ndarray = np.concatenate(per_shard) if per_shard else np.zeros(0, np.int64)
        """Tokens per example (int64), in stored order."""
        # Where example i lives: shard and start offset inside that shard.
        self._shard_of = np.repeat(np.arange(len(shards), dtype=np.int64), [len(x) for x in per_shard])
        self._starts = (
            np.concatenate([np.asarray(o[:-1], dtype=np.int64) for _, _, o in shards])
            if shards
            else np.zeros(0, np.int64)
        )

    @classmethod
    def open(cls, dir: str | Path, split: str) -> "TokenizedSplit":
        """Memory-map the shards of `split` ("train" or "val") listed in dir/manifest.json."""
        dir = Path(dir)
        manifest = json.loads((dir / "manifest.json").read_text(encoding="utf-8"))
        if split not in manifest["splits"]:
            raise KeyError(f"{dir}: no split '{split}' (have {sorted(manifest['splits'])})")
        shards = [
            (
                np.load(dir / s["tokens"], mmap_mode="r"),
                np.load(dir / s["mask"], mmap_mode="r"),
                np.load(dir / s["offsets"]),  # small; read fully
            )
            for s in manifest["splits"][split]["shards"]
        ]
        return cls(split, shards)

    @property
    def n_examples(self) -> int:
        return len(self.lengths)

    def __len__(self) -> int:
        return self.n_examples

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @functools.cached_property
    def n_supervised(self) -> int:
        """Tokens with mask 1: the targets one epoch trains on (in either batching mode)."""
        return int(sum(int(np.count_nonzero(m)) for m in self._masks))

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens uint16, mask uint8) of example i: read-only views into the memory-mapped
        shards (cast tokens to int64 before mixing them with -100)."""
        s, start = int(self._shard_of[i]), int(self._starts[i])
        end = start + int(self.lengths[i])
        return self._tokens[s][start:end], self._masks[s][start:end]

    def gather(self, ex: np.ndarray, within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64) and mask (uint8) at positions `within` of examples `ex` (same shape)."""
        flat = self._starts[ex] + within
        if len(self._tokens) == 1:
            return self._tokens[0][flat].astype(np.int64), np.asarray(self._masks[0][flat])
        shard = self._shard_of[ex]
        tokens = np.empty(ex.shape, dtype=np.int64)
        mask = np.empty(ex.shape, dtype=np.uint8)
        for s in np.unique(shard):
            sel = shard == s
            tokens[sel] = self._tokens[s][flat[sel]]
            mask[sel] = self._masks[s][flat[sel]]
        return tokens, mask


@dataclass
class Batch:
    input_ids: torch.Tensor
    """(B, T) int64 token ids; padding positions hold EOT."""
    labels: torch.Tensor
    """(B, T) int64 next-token targets; -100 where not supervised or padding."""
    n_real_tokens: int
    """Input positions that are not padding (what throughput counts)."""
    n_supervised: int
    """Positions with a label (labels != -100): what the loss averages over."""
    n_pad: int
    """Padding input positions; padding fraction = n_pad / (n_pad + n_real_tokens)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.n_real_tokens,
            self.n_supervised,
            self.n_pad,
        )

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that `.to("cuda", non_blocking=True)` is truly asynchronous."""
        return Batch(self.input_ids.pin_memory(), self.labels.pin_memory(), self.n_real_tokens, self.n_supervised, self.n_pad)


class BatchLoader:
    """Deterministic batches of one split for one rank; see the module docstring."""

    def __init__(
        self,
        split: TokenizedSplit,
        batching: Literal["pack", "pad"],
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batching not in ("pack", "pad"):
            raise ValueError(f"batching must be 'pack' or 'pad', got {batching!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        longest = int(split.lengths.max()) if split.n_examples else 0
        if batching == "pad" and longest > seq_len + 1:
            raise ValueError(
                f"the {split.name} split has examples of {longest} tokens (prepared for a longer seq_len); "
                f"pad batching with seq_len={seq_len} holds at most {seq_len + 1}"
            )
        self.split = split
        self.batching = batching
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses (call it before each epoch)."""
        self.epoch = epoch

    # -------------------------------------------------------------- the epoch's plan

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _n_blocks(self) -> int:
        # targets are stream positions 1..S-1; each block of seq_len + 1 covers seq_len of them
        n_targets = max(self.split.n_tokens - 1, 0)
        return -(-n_targets // self.seq_len)

    def global_batches(self) -> int:
        """Batches in the epoch across all ranks, before padding to a multiple of world_size."""
        n_items = self._n_blocks() if self.batching == "pack" else self.split.n_examples
        return -(-n_items // self.batch_size)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return -(-self.global_batches() // self.world_size)

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        n = self.split.n_examples
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def _pad_plan(self) -> list[np.ndarray]:
        """Example ids of every global batch, length-bucketed."""
        rng = self._rng()
        order = self._order(rng)
        chunk = self.batch_size * PAD_BUCKET_BATCHES
        batches: list[np.ndarray] = []
        for c in range(0, len(order), chunk):
            ids = order[c : c + chunk]
            ids = ids[np.argsort(self.split.lengths[ids], kind="stable")]
            batches.extend(ids[b : b + self.batch_size] for b in range(0, len(ids), self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _pack_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(example order, stream start of each ordered example + total at the end)."""
        order = self._order(self._rng())
        cum = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(self.split.lengths[order], out=cum[1:])
        return order, cum

    def rank_batch_ids(self) -> list[int]:
        """Global batch indices this rank takes this epoch (padded by repeating from the start)."""
        g = self.global_batches()
        if g == 0:
            return []
        return [(self.rank + j * self.world_size) % g for j in range(len(self))]

    # -------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """This rank's batches of the current epoch, skipping the first `start_batch` (resume)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside [0, {len(self)}]")
        ids = self.rank_batch_ids()[start_batch:]
        if self.batching == "pack":
            order, cum = self._pack_plan()
            n_blocks = self._n_blocks()
            for g in ids:
                blocks = np.arange(g * self.batch_size, min((g + 1) * self.batch_size, n_blocks), dtype=np.int64)
                yield self._pack_batch(blocks, order, cum)
        else:
            plan = self._pad_plan()
            for g in ids:
                yield self._pad_batch(plan[g])

    def _pack_batch(self, blocks: np.ndarray, order: np.ndarray, cum: np.ndarray) -> Batch:
        total = int(cum[-1])
        pos = blocks[:, None] * self.seq_len + np.arange(self.seq_len + 1, dtype=np.int64)[None, :]
        valid = pos < total
        pos = np.minimum(pos, total - 1)
        k = np.searchsorted(cum, pos, side="right") - 1  # which ordered example holds pos
        tokens, mask = self.split.gather(order[k], pos - cum[k])
        return _make_batch(tokens, mask, valid)

    def _pad_batch(self, ex: np.ndarray) -> Batch:
        lengths = self.split.lengths[ex]
        width = int(lengths.max())  # T + 1
        within = np.arange(width, dtype=np.int64)[None, :]
        valid = within < lengths[:, None]
        tokens, mask = self.split.gather(np.broadcast_to(ex[:, None], valid.shape), np.minimum(within, lengths[:, None] - 1))
        return _make_batch(tokens, mask, valid)


def _make_batch(tokens: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> Batch:
    """(B, T+1) tokens/mask/valid -> inputs x = [:, :-1] and labels from y = [:, 1:]."""
    tokens = np.where(valid, tokens, EOT_ID)
    supervised = valid[:, 1:] & (mask[:, 1:] == 1)
    labels = np.where(supervised, tokens[:, 1:], IGNORE_INDEX)
    n_real = int(np.count_nonzero(valid[:, :-1]))
    return Batch(
        input_ids=torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
        n_real_tokens=n_real,
        n_supervised=int(np.count_nonzero(supervised)),
        n_pad=int(valid[:, :-1].size) - n_real,
    )
