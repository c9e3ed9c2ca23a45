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

import dataclasses
import functools
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

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

    @functools.cached_property
    def _mask_prefix(self) -> list[np.ndarray]:
        """Per shard, the running count of mask-1 tokens with a leading 0 (len + 1 entries):
        the supervised tokens of any span of a shard in O(1), without reading the span.
        Built once per split (one pass over the masks; 4 bytes a token)."""
        out = []
        for m in self._masks:
            prefix = np.zeros(len(m) + 1, dtype=np.int32 if len(m) < 2**31 else np.int64)
            np.cumsum(m, dtype=prefix.dtype, out=prefix[1:])
            out.append(prefix)
        return out

    def supervised_before(self, ex: np.ndarray, within: np.ndarray) -> np.ndarray:
        """Mask-1 tokens of examples `ex` before position `within` (same shape; `within` may
        equal the example's length), as int64."""
        flat = self._starts[ex] + within
        out = np.empty(np.shape(ex), dtype=np.int64)
        shard = self._shard_of[ex]
        for s in np.unique(shard):
            sel = shard == s
            prefix = self._mask_prefix[s]
            out[sel] = prefix[flat[sel]] - prefix[self._starts[ex[sel]]]
        return out

    @functools.cached_property
    def example_supervised(self) -> np.ndarray:
        """Mask-1 tokens of each example (int64), in stored order."""
        ex = np.arange(self.n_examples, dtype=np.int64)
        return self.supervised_before(ex, self.lengths)

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
    n_attention_pairs: int = 0
    """Query-key pairs among real positions: the sum over rows of (real length)^2, what
    metrics.training_flops charges attention for."""
    target_index: torch.Tensor | None = None
    """(n_supervised,) int64 indices into labels.reshape(-1) of the supervised positions, for
    `GPT.forward(..., target_index=)`: finding them on the device would be a nonzero(), whose
    result size the host must wait for. None in batches built by hand."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device, non_blocking=non_blocking) if t is not None else None

        return dataclasses.replace(self, input_ids=move(self.input_ids), labels=move(self.labels),
                                   target_index=move(self.target_index))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that `.to("cuda", non_blocking=True)` is truly asynchronous."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.pin_memory() if t is not None else None

        return dataclasses.replace(self, input_ids=pin(self.input_ids), labels=pin(self.labels),
                                   target_index=pin(self.target_index))


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

    def global_batch_supervised(self) -> np.ndarray:
        """Supervised tokens (labels != -100) of each global batch of the epoch (int64, one per
        batch, before padding), computed from the plan without building any batch."""
        if self.global_batches() == 0:
            return np.zeros(0, dtype=np.int64)
        if self.batching == "pad":
            plan = self._pad_plan()
            ex = np.concatenate(plan)
            # a row's targets are its tokens 1.., so token 0 never counts (its mask is 0 anyway)
            first = self.split.supervised_before(ex, np.ones_like(ex))
            per_row = self.split.example_supervised[ex] - first
            starts = np.cumsum([0] + [len(b) for b in plan[:-1]])
            return np.add.reduceat(per_row, starts)
        # pack: global batch g holds blocks g*B .. (g+1)*B - 1, whose targets are the stream
        # positions g*B*T + 1 .. (g+1)*B*T (those before the end): one contiguous span, so its
        # count is a difference of the stream's supervised prefix at the two ends
        order, cum = self._pack_plan()
        total = int(cum[-1])
        per_batch = self.batch_size * self.seq_len
        ends = np.minimum(np.arange(self.global_batches() + 1, dtype=np.int64) * per_batch + 1, total)
        k = np.minimum(np.searchsorted(cum, ends, side="right") - 1, len(order) - 1)  # example holding each end
        ex_before = np.concatenate([[0], np.cumsum(self.split.example_supervised[order])])
        prefix = ex_before[k] + self.split.supervised_before(order[k], ends - cum[k])
        return np.diff(prefix)

    def step_supervised_counts(self, grad_accum: int) -> np.ndarray:
        """Supervised tokens of each optimizer step of the epoch, summed over every rank's
        micro-batches (int64, one per step of `micro_batch_groups(self, grad_accum)`).

        This is the N_global the step's loss is normalised by, known before the step runs
        and without an all-reduce: the plan is the same on every rank, so every rank gets
        the same array. Step s is micro-batches j in [s * grad_accum, (s + 1) * grad_accum)
        of each rank; rank r's j-th is padded-list entry r + j * world_size, so the step is
        one contiguous span of the padded list (repeats count: they are trained on)."""
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        per_batch = self.global_batch_supervised()
        if len(per_batch) == 0:
            return np.zeros(0, dtype=np.int64)
        padded = per_batch[np.arange(len(self) * self.world_size) % len(per_batch)]
        return np.add.reduceat(padded, np.arange(0, len(padded), grad_accum * self.world_size))

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


class Prefetcher:
    """Batches of `batches`, built ahead by a background thread and handed to `device`.

    The numpy work of building a batch (gather, masks) then overlaps the previous step
    instead of sitting on the critical path, and on CUDA the host copies are pinned, so
    `.to(device, non_blocking=True)` does not make the host wait. The copy itself is
    issued from the iterating thread one batch ahead: the batch handed out has been on
    its way to the device since the previous one was handed out. Order is unchanged.

    At most `depth` built batches wait in the queue (plus the one being built and the one
    being copied), which bounds the host memory. depth=0: no thread, each batch is built
    when it is asked for (the same batches). Each iteration starts its own thread, which
    starts `batches` (so set the loader's epoch first); an exception raised while building
    is re-raised in the iterating thread with its original traceback, and stopping early
    (break, close(), garbage collection of the iterator) stops the thread.
    """

    def __init__(self, batches: Iterable[Batch], device: torch.device | str, depth: int = 2):
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.batches = batches
        self.device = torch.device(device)
        self.depth = depth
        self.pin = self.device.type == "cuda"

    def __iter__(self) -> Iterator[Batch]:
        if self.depth == 0:
            for batch in self.batches:
                yield batch.to(self.device, non_blocking=True)
            return
        # the queue itself is unbounded, so a put never blocks (an error always gets through);
        # the slots bound it: the producer takes one per batch and the consumer gives it back
        ready: queue.SimpleQueue = queue.SimpleQueue()
        slots = threading.Semaphore(self.depth)
        stop = threading.Event()
        # pinning allocates through the CUDA context of the thread's current device: make it
        # this rank's device, or every rank would create a context on device 0
        cuda_index = None
        if self.pin:
            cuda_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        thread = threading.Thread(
            target=self._produce, args=(ready, slots, stop, cuda_index), name="batch-prefetch", daemon=True
        )
        thread.start()
        try:
            ahead: Batch | None = None
            while True:
                item = ready.get()
                slots.release()
                moved = item.to(self.device, non_blocking=True) if isinstance(item, Batch) else None
                if ahead is not None:
                    yield ahead
                if isinstance(item, _Failed):  # after the batches built before it, as without prefetching
                    raise item.error  # it carries the producer's traceback
                if moved is None:  # _END
                    return
                ahead = moved
        finally:
            # the producer checks `stop` after each slot it takes; this slot wakes it if it waits
            # for one, so it ends after at most the batch it is building (no polling meanwhile)
            stop.set()
            slots.release()
            thread.join()

    def _produce(
        self, ready: queue.SimpleQueue, slots: threading.Semaphore, stop: threading.Event, cuda_index: int | None
    ) -> None:
        try:
            if cuda_index is not None:
                torch.cuda.set_device(cuda_index)
            for batch in self.batches:
                batch = batch.pin_memory() if self.pin else batch
                slots.acquire()  # wait until fewer than `depth` built batches wait
                if stop.is_set():
                    return
                ready.put(batch)
            ready.put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            ready.put(_Failed(e))


_END = object()  # the producer's last item when the batches ran out


@dataclass
class _Failed:
    error: BaseException


def _make_batch(tokens: np.ndarray, mask: np.ndarray, valid: np.ndarray) -> Batch:
    """(B, T+1) tokens/mask/valid -> inputs x = [:, :-1] and labels from y = [:, 1:]."""
    tokens = np.where(valid, tokens, EOT_ID)
    supervised = valid[:, 1:] & (mask[:, 1:] == 1)
    labels = np.where(supervised, tokens[:, 1:], IGNORE_INDEX)
    row_real = np.count_nonzero(valid[:, :-1], axis=1).astype(np.int64)  # real positions are a prefix of each row
    n_real = int(row_real.sum())
    target_index = np.flatnonzero(supervised).astype(np.int64)  # row-major: labels.reshape(-1)
    return Batch(
        input_ids=torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
        n_real_tokens=n_real,
        n_supervised=len(target_index),
        n_pad=int(valid[:, :-1].size) - n_real,
        target_index=torch.from_numpy(target_index),
        n_attention_pairs=int((row_real**2).sum()),
    )
