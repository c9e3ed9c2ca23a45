"""Batches from prepared shards: memory-mapped, deterministic, rank-aware.

Three ways to turn examples into (B, T) batches (`data.batching`):

- `pack` (the default for instruction data): whole examples are packed into rows of
  seq_len + 1 tokens (x = row[:-1], y = row[1:]); no example is split across rows. Each
  row carries per-token document ids and per-example position ids that restart at 0, so
  the model attends only within an example and sees every example at the positions it is
  asked from at generation time (model.py, attention.py). A row's tail that no further
  example fits into is padding: not attended to, not counted.
- `pack_concat`: the same rows, read as one text: plain causal attention across the
  examples of a row and positions 0..T-1 (GPT-2 pretraining's choice for plain text; for
  instruction data it trains examples in the context of unrelated ones).
- `pad`: one example per row, padded to the longest in its batch.

Placement (both packs): each epoch the examples are shuffled by (seed, epoch) and cut into
chunks of PACK_CHUNK_EXAMPLES; each chunk is placed longest first into the first row
with room (first-fit decreasing), which leaves little padding while the rows still mix
examples from all of the chunk; then the rows are shuffled and cut into batches of
batch_size rows. Pad batching cuts the shuffled order into chunks of batch_size * 50,
sorts each chunk by length, cuts batches and shuffles them (length bucketing).

Labels are -100 (ignored by cross-entropy) where the target token is not supervised (its
mask is 0) or is padding; padding uses EOT as the input id. Because token 0 of an example
is never supervised (see prepare.py), every mode supervises exactly the same tokens, and
the first token of the next example in a row is never a target of the previous one.

An epoch's plan is the example ids of every row of every global batch: a pure function of
(data, seed, epoch, seq_len, batch_size), the same on every rank. Rank r takes global
batches r, r + world_size, r + 2 * world_size, ... When the count is not a multiple of
world_size, the list is padded by repeating batches from its start (as torch's
DistributedSampler does), so every rank runs the same number of steps; those few
repeated batches are seen twice in that epoch.
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
BATCHINGS = ("pack", "pack_concat", "pad")
PAD_BUCKET_BATCHES = 50  # pad mode sorts by length within chunks of batch_size * 50 examples
# Packing places this many consecutive examples of the shuffled order at a time. Larger
# chunks pad less (only a chunk's last few rows are loosely filled) but keep examples
# near their place in the shuffled order less. On the bundled sample (seq_len 256 and
# 1024) chunks of 256 or 1,024 padded more than 2,048, and 4,096 no less; the padding at
# 2,048 is in docs/data.md.
PACK_CHUNK_EXAMPLES = 2048
# Bumped whenever some mode's epoch plan changes, so that a checkpoint is never resumed
# on other batches than it would have seen (train.check_resumable). 1: `pack` cut one
# stream of examples into blocks; 2: whole examples placed first-fit (pad unchanged).
PLAN_VERSION = 2
PAD_DOC_ID = -1  # document id of a packed row's padding tail: no real token attends to it


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
    """Query-key pairs attention needs among real positions: the sum over the sequences
    that attend to themselves (an example in `pack` and `pad`, a whole row in
    `pack_concat`) of their length squared; what metrics.training_flops charges."""
    target_index: torch.Tensor | None = None
    """(n_supervised,) int64 indices into labels.reshape(-1) of the supervised positions, for
    `GPT.forward(..., target_index=)`: finding them on the device would be a nonzero(), whose
    result size the host must wait for. None in batches built by hand."""
    doc_ids: torch.Tensor | None = None
    """(B, T) int64, `pack` only: which example of its row each position belongs to (0, 1,
    ...; the padding tail PAD_DOC_ID), for `GPT.forward(..., doc_ids=)`."""
    position_ids: torch.Tensor | None = None
    """(B, T) int64, `pack` only: each position's index within its example (padding: 0)."""

    _TENSORS = ("input_ids", "labels", "target_index", "doc_ids", "position_ids")

    def model_inputs(self) -> dict:
        """The keyword arguments GPT.forward takes from a batch besides (input_ids, labels)."""
        return {"target_index": self.target_index, "doc_ids": self.doc_ids, "position_ids": self.position_ids}

    def _map(self, fn) -> "Batch":
        return dataclasses.replace(self, **{k: fn(getattr(self, k)) for k in self._TENSORS if getattr(self, k) is not None})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that `.to("cuda", non_blocking=True)` is truly asynchronous."""
        return self._map(lambda t: t.pin_memory())


@dataclass(frozen=True)
class EpochPlan:
    """Which examples go where in one epoch: global batch g holds rows
    batch_start[g] .. batch_start[g + 1] - 1, and row r holds the examples
    examples[row_start[r]:row_start[r + 1]], in the order they sit in the row."""

    examples: np.ndarray
    row_start: np.ndarray
    batch_start: np.ndarray

    @property
    def n_batches(self) -> int:
        return len(self.batch_start) - 1

    def batch_rows(self, g: int) -> list[np.ndarray]:
        rs = self.row_start[self.batch_start[g] : self.batch_start[g + 1] + 1]
        return [self.examples[a:b] for a, b in zip(rs[:-1], rs[1:])]

    def batch_examples(self, g: int) -> np.ndarray:
        rows = self.row_start[[self.batch_start[g], self.batch_start[g + 1]]]
        return self.examples[rows[0] : rows[1]]


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices into `lengths` grouped into bins of total <= capacity: longest first, each
    into the first bin with room. Bins list their items in index order.

    Written here rather than taken from a library: it is the dozen lines below, and the
    packing libraries (e.g. binpacking) are a dependency for no gain in speed."""
    order = np.argsort(-lengths, kind="stable")
    room = np.empty(len(lengths), dtype=np.int64)  # free tokens of each open bin
    bins: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        fits = np.flatnonzero(room[: len(bins)] >= n)
        if len(fits):
            b = int(fits[0])
            bins[b].append(int(i))
            room[b] -= n
        else:
            room[len(bins)] = capacity - n
            bins.append([int(i)])
    return [sorted(b) for b in bins]


class BatchLoader:
    """Deterministic batches of one split for one rank; see the module docstring."""

    def __init__(
        self,
        split: TokenizedSplit,
        batching: Literal["pack", "pack_concat", "pad"],
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        longest = int(split.lengths.max()) if split.n_examples else 0
        if longest > seq_len + 1:
            raise ValueError(
                f"the {split.name} split has examples of {longest} tokens (prepared for a longer seq_len); "
                f"a row of seq_len={seq_len} holds at most {seq_len + 1}"
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
        self._plan: tuple[int, EpochPlan] | None = None  # (epoch, its plan)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses (call it before each epoch)."""
        self.epoch = epoch

    # -------------------------------------------------------------- the epoch's plan

    def plan(self) -> EpochPlan:
        """The current epoch's plan (computed once per epoch and kept)."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._pad_plan() if self.batching == "pad" else self._pack_plan())
        return self._plan[1]

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        n = self.split.n_examples
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def _pad_plan(self) -> EpochPlan:
        """One example per row; batches length-bucketed."""
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
        examples = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        sizes = np.array([0] + [len(b) for b in batches], dtype=np.int64)
        return EpochPlan(examples, np.arange(len(examples) + 1, dtype=np.int64), np.cumsum(sizes))

    def _pack_plan(self) -> EpochPlan:
        """Whole examples first-fit into rows of seq_len + 1 tokens, chunk by chunk of the
        shuffled order; rows shuffled, then batch_size rows a batch."""
        rng = self._rng()
        order = self._order(rng)
        rows: list[np.ndarray] = []
        for c in range(0, len(order), PACK_CHUNK_EXAMPLES):
            ids = order[c : c + PACK_CHUNK_EXAMPLES]
            rows.extend(ids[b] for b in first_fit_decreasing(self.split.lengths[ids], self.seq_len + 1))
        if self.shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        examples = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        row_start = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
        batch_start = np.append(np.arange(0, len(rows), self.batch_size, dtype=np.int64), len(rows))
        return EpochPlan(examples, row_start, batch_start)

    def global_batches(self) -> int:
        """Batches in the epoch across all ranks, before padding to a multiple of world_size."""
        if self.batching == "pad":  # known without placing anything
            return -(-self.split.n_examples // self.batch_size)
        return self.plan().n_batches

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return -(-self.global_batches() // self.world_size)

    def global_batch_supervised(self) -> np.ndarray:
        """Supervised tokens (labels != -100) of each global batch of the epoch (int64, one per
        batch, before padding), computed from the plan without building any batch: every
        example's targets are its tokens 1.. (token 0 never counts; its mask is 0 anyway)."""
        plan = self.plan()
        if plan.n_batches == 0:
            return np.zeros(0, dtype=np.int64)
        ex = plan.examples
        per_example = self.split.example_supervised[ex] - self.split.supervised_before(ex, np.ones_like(ex))
        return np.add.reduceat(per_example, plan.row_start[plan.batch_start[:-1]])

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
        plan = self.plan()
        for g in self.rank_batch_ids()[start_batch:]:
            if self.batching == "pad":
                yield self._pad_batch(plan.batch_examples(g))
            else:
                yield self._pack_batch(plan.batch_rows(g))

    def _pack_batch(self, rows: list[np.ndarray]) -> Batch:
        """Rows of whole examples, each row seq_len + 1 wide, its tail padded."""
        width = self.seq_len + 1
        ex = np.concatenate(rows)
        lengths = self.split.lengths[ex]
        first = np.cumsum([0] + [len(r) for r in rows[:-1]])  # index in ex of each row's first example
        row_of = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
        starts = np.cumsum(lengths) - lengths  # of each example, in the rows laid end to end
        start_in_row = starts - starts[first][row_of]  # column of each example's token 0
        doc_in_row = np.arange(len(ex)) - first[row_of]
        # one entry per token: (row, column) it lands at, and which token of which example it is
        within = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
        r = np.repeat(row_of, lengths)
        c = np.repeat(start_in_row, lengths) + within
        tokens = np.full((len(rows), width), EOT_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.uint8)
        valid = np.zeros((len(rows), width), dtype=bool)
        tokens[r, c], mask[r, c] = self.split.gather(np.repeat(ex, lengths), within)
        valid[r, c] = True
        if self.batching == "pack_concat":  # the whole row is one sequence
            return _make_batch(tokens, mask, valid)
        doc = np.full((len(rows), width), PAD_DOC_ID, dtype=np.int64)
        pos = np.zeros((len(rows), width), dtype=np.int64)
        doc[r, c] = np.repeat(doc_in_row, lengths)
        pos[r, c] = within
        # an example's input positions: its tokens, less the last when it ends the full row
        inputs = np.minimum(start_in_row + lengths, self.seq_len) - start_in_row
        return _make_batch(tokens, mask, valid, doc_ids=doc[:, :-1], position_ids=pos[:, :-1],
                           attention_pairs=int((inputs**2).sum()))

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


def _make_batch(
    tokens: np.ndarray,
    mask: np.ndarray,
    valid: np.ndarray,
    doc_ids: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
    attention_pairs: int | None = None,
) -> Batch:
    """(B, T+1) tokens/mask/valid -> inputs x = [:, :-1] and labels from y = [:, 1:].
    attention_pairs defaults to one sequence per row (its real positions, a prefix)."""
    tokens = np.where(valid, tokens, EOT_ID)
    supervised = valid[:, 1:] & (mask[:, 1:] == 1)
    labels = np.where(supervised, tokens[:, 1:], IGNORE_INDEX)
    row_real = np.count_nonzero(valid[:, :-1], axis=1).astype(np.int64)  # real positions are a prefix of each row
    n_real = int(row_real.sum())
    target_index = np.flatnonzero(supervised).astype(np.int64)  # row-major: labels.reshape(-1)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)) if a is not None else None  # noqa: E731
    return Batch(
        input_ids=as_tensor(tokens[:, :-1]),
        labels=as_tensor(labels),
        n_real_tokens=n_real,
        n_supervised=len(target_index),
        n_pad=int(valid[:, :-1].size) - n_real,
        target_index=as_tensor(target_index),
        n_attention_pairs=int((row_real**2).sum()) if attention_pairs is None else attention_pairs,
        doc_ids=as_tensor(doc_ids),
        position_ids=as_tensor(position_ids),
    )
