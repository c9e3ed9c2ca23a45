"""`distrib-gpt plan`: per-GPU memory and compute of a training run, before any GPU is rented.

The formulas describe what *this* code holds (model.py, precision.py, parallel.py, optim.py),
not a generic transformer. Symbols: N parameters (the tied embedding / LM head counted once),
T parameter tensors (12L + 4), L layers, a heads, h width, V the padded vocabulary (50257 ->
50304), P positions, b micro-batch, s sequence length, n = ceil(f·b·s) rows through the LM head
(f = --supervised-fraction: the model runs the LM head only at supervised positions; f = 1 is
the upper bound), c bytes of the compute dtype (2 for fp16/bf16, 4 for fp32/tf32), S the shard
group (--gpus; --gpus-per-node for hsdp). [approx] marks the terms that are approximations;
everything else is exact and tested (tests/test_plan.py) on CPU.

Parameters
    N = V·h + P·h + L·(12h² + 13h) + 2h

Model state per GPU (Rajbhandari et al. 2020, "ZeRO": 16 B/param under mixed precision)
    single        fp32 params 4N + fp32 grads 4N + AdamW exp_avg, exp_avg_sq 8N + step 4T
    ddp           + DDP's gradient buckets 4N: with gradient_as_bucket_view=False (our default)
                  every gradient is copied into a flat bucket (PyTorch DDP docs: the saving of
                  gradient_as_bucket_view "will be equal to the total gradients size")
    zero1         as ddp, but AdamW state only for the tensors ZeroRedundancyOptimizer gives this
                  rank: whole tensors, largest first, greedily to the least-loaded rank. The
                  most-loaded rank is reported; for GPT-2 it holds the V×h embedding alone.
    fsdp_full, fsdp_grad_op, hsdp
                  params, grads and AdamW state sharded on dim 0 over S ranks: 16 B·N/S + 4T
                  (FSDP2 pads every tensor to ceil(dim0/S) rows; rank 0, reported, holds full
                  chunks), plus [approx] unsharded copies, gathered as
                  precision.fsdp_mixed_precision decides: the blocks' matmul weights in the
                  compute dtype, the root and the blocks' LayerNorms in fp32, as DDP's
                  autocast treats them: 4·root + k·(c·mm + 4·4h), root = V·h + P·h + 2h (never
                  resharded after forward), mm = 12h² + 9h (a block's Linear weights and
                  biases; block = mm + 4h of LayerNorms = 12h² + 13h), k = 2 (the block
                  computing + the one prefetched) for fsdp_full/hsdp, k = L for fsdp_grad_op
                  (kept from forward to backward).
    autocast      under fp16/bf16, the half-precision copies of the matmul weights that
                  autocast makes: autocast caches them for the forward and the Linear layers save
                  them for backward. single/ddp/zero1: 2·(12h²·L + V·h); FSDP: the LM head's
                  only, 2·V·h (the blocks' are gathered in c already, the root stays fp32).

Activations per GPU (saved for backward)
    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    eq. 1): s·b·h·(34 + 5·a·s/h) bytes per layer, everything 16-bit, with dropout masks and
    materialised attention scores. Three differences for our model:
    - F.scaled_dot_product_attention (flash / memory-efficient kernels) stores no a·s² scores or
      softmax: the 5·a·s²·b term becomes the kernel's fp32 log-sum-exp, 4·a·b·s bytes, and the
      kernel's output, which is also c_proj's input (one storage: the kernels return it in
      (b, s, a, h/a) layout, so .transpose(1, 2).contiguous() copies nothing);
    - dropout 0 (our default) stores no masks: -2·sbh. With dropout > 0 [approx]: 1-byte masks,
      +2·sbh per layer and +sbh after the embeddings (CUDA's fused attention keeps only RNG
      state for its own dropout);
    - LayerNorm inputs are fp32 under autocast: 4 bytes, not 2 (the residual stream is fp32
      under every strategy: FSDP casts neither the blocks' inputs nor the LayerNorms).
    Per layer:   sbh·(8 + 14c) + 16·bs (LayerNorm mean, rstd) + 4·abs
                 (36·sbh under fp16/bf16, 64·sbh under fp32/tf32, plus the small terms)
    Outside:     token and position ids 8bs + 8s, final LayerNorm 4sbh + 8bs, LM-head input
                 c·n·h, row indices and targets 16n, the loss's fp32 log-probabilities 4·n·V,
                 4 bytes of loss bookkeeping.
    Checkpointed (model.activation_checkpointing, per block): each block keeps only its fp32
                 input, 4·sbh, plus one block's activations rebuilt during backward
                 (the per-layer bytes, + its weight copies under autocast).

Working set of the backward pass (measured on CPU, bench/plan_vs_measured.py): its peak is
the largest of three moments (the tied embedding is fp32 under every strategy, so are its
gradients):
    - backward start: saved activations + autocast copies + the loss transient, 8·n·V (the fp32
      gradients of the log-probabilities and of the logits next to the saved log-probabilities);
    - after the LM head: saved activations + autocast copies + the recomputed block + 4·V·h, the
      LM head's gradient of the tied embedding, which autograd holds until the embedding's own
      contribution arrives at the very end (+ under FSDP [approx] one block's unsharded gradient
      and its fp32 reduce-scatter input, (c + 4)·mm + 8·4h);
    - the embedding's backward: 3·4·V·h (the held gradient, the embedding's dense gradient and
      their sum), activations already freed (FSDP: or 8·root, the root's gradient and its
      reduce-scatter input).

Total and fit: resident terms + the peak phase. It is an upper bound by up to the gradients
when grad_accum = 1 (set_to_none: gradients appear as backward frees activations); from the
second micro-batch of an accumulated step they are resident. Fits when
total·(1 + fragmentation) + reserve <= the GPU's memory (metrics.GPU_SPECS); defaults 10 %
caching-allocator fragmentation and a 1.5 GiB reserve: ~0.8 GiB of nominal capacity the
driver does not expose + ~0.5-0.7 GiB CUDA context, cuBLAS workspace and NCCL buffers.
Not modelled: the foreach (unfused) AdamW temporaries (fp16 under FSDP only), gradient-norm
clipping scratch, FSDP all-gather/reduce-scatter padding.

Compute
    FLOPs per token = metrics.flops_per_token: 6·(N - P·h) + 12·L·a·(h/a)·s (PaLM appendix B,
    nanoGPT's estimate_mfu; the same figure train.py reports MFU with), x 4/3 under activation
    checkpointing (one more forward; forward is 1/3 of forward + backward; slightly high as
    the LM head is not recomputed). Tokens per step = b·s·grad_accum·gpus.
    Step time = tokens per step · FLOPs per token / (gpus · peak · MFU), peak from
    metrics.GPU_PEAK_TFLOPS for the precision; communication assumed overlapped. MFU default
    0.25: nanoGPT's GPT-2 124M reproduction (8×A100 40GB, compiled, bf16; 600,000 steps of
    491,520 tokens ≈ 295e9 tokens in "about 4 days" per its README, "~5 days" per its config)
    works out at 85-107k tokens/s/GPU × 855 MFLOP/token = 23-29 % of 312 TFLOP/s; 0.25 is the
    middle, rounded down because our default is eager (parallel.compile=false). Under
    checkpointing read it as the utilisation of the FLOPs actually executed.
    Epoch time = dataset tokens / tokens per second.

Chinchilla (Hoffmann et al. 2022): a compute-optimal *pretraining* of N parameters sees about
20·N tokens. For fine-tuning it is a scale reference, not a target.

Dataset tokens: --dataset-tokens; else the prepared manifest of a --config (its train split);
else the Dolly-15k estimate DOLLY_15K_TOKENS (see its comment).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .metrics import GPU_PEAK_TFLOPS, GPU_SPECS, flops_per_token
from .model import GPT_SHAPES, GPTConfig

GiB = 1 << 30
STRATEGIES = ("single", "ddp", "zero1", "fsdp_full", "fsdp_grad_op", "hsdp")
FSDP = ("fsdp_full", "fsdp_grad_op", "hsdp")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
HALF = ("fp16", "bf16")

DEFAULT_MFU = 0.25  # nanoGPT's 124M reproduction on A100s: 23-29 % (module docstring)
DEFAULT_RESERVE_GIB = 1.5
DEFAULT_FRAGMENTATION = 0.10
CHINCHILLA_TOKENS_PER_PARAM = 20

# Dolly-15k (databricks/databricks-dolly-15k), estimated offline: 15,011 records whose
# instruction + context + response text is ~11.8 MB (the Hugging Face Arrow size of the four
# string columns, 12,195,589 bytes, less 240 kB of int32 offsets and ~0.16 MB of category
# names), at 4.14 bytes per GPT-2 token (measured with our tokenizer on the English texts in
# /usr/share/common-licenses, 125,877 bytes -> 30,420 tokens), plus 31 tokens of Dolly
# template per record (29 without context, 33 with) and the end-of-text token. About ±15 %:
# the bytes-per-token ratio of Dolly's text is the uncertain part.
DOLLY_15K_RECORDS = 15_011
DOLLY_15K_TOKENS = round(11.8e6 / 4.14 + DOLLY_15K_RECORDS * (31 + 1))  # ≈ 3.33M
DOLLY_VAL_FRACTION = 0.05  # data.val_fraction's default: the train split is the other 95 %


class PlanError(ValueError):
    """Bad planner input (unknown name, impossible combination); the message says what is known."""


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a GPT: the shapes model.GPT builds."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab: int  # padded (GPTConfig.padded_vocab_size)
    block_size: int
    dropout: float = 0.0

    @classmethod
    def from_config(cls, cfg: GPTConfig) -> Shape:
        return cls(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.padded_vocab_size, cfg.block_size, cfg.dropout)

    @classmethod
    def named(cls, name: str, **overrides: Any) -> Shape:
        if name not in GPT_SHAPES:
            raise PlanError(f"unknown model {name!r}; known: {', '.join(GPT_SHAPES)}")
        return cls.from_config(GPTConfig.from_name(name, **overrides))

    def tensors(self) -> list[tuple[int, ...]]:
        """Parameter shapes in model.parameters() order (the tied LM head once)."""
        h = self.n_embd
        block = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]
        return [(self.vocab, h), (self.block_size, h)] + block * self.n_layer + [(h,), (h,)]

    @property
    def block_params(self) -> int:
        return 12 * self.n_embd**2 + 13 * self.n_embd

    @property
    def root_params(self) -> int:
        """wte (= lm_head), wpe, ln_f: FSDP's root unit."""
        return (self.vocab + self.block_size + 2) * self.n_embd

    @property
    def n_params(self) -> int:
        return self.root_params + self.n_layer * self.block_params

    @property
    def matmul_weights(self) -> int:
        """Elements of the Linear weights autocast copies: 12h² per block + the LM head."""
        return self.n_layer * 12 * self.n_embd**2 + self.vocab * self.n_embd


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def fsdp_shard_numel(shape: Shape, shards: int) -> int:
    """Elements rank 0 holds under FSDP2: every tensor cut on dim 0 into ceil(dim0/S) rows."""
    return sum(math.ceil(t[0] / shards) * (_numel(t) // t[0]) for t in shape.tensors())


def zero1_rank_load(shape: Shape, world: int) -> tuple[int, int]:
    """(elements, tensors) of the rank with the most AdamW state (8 B per element + 4 B per
    tensor) under ZeroRedundancyOptimizer's partition: per param group (decay = 2-D tensors,
    then no-decay, as optim.build_optimizer builds them), largest tensor first, each to the
    rank with the fewest elements so far."""
    sizes, counts = [0] * world, [0] * world
    tensors = shape.tensors()
    for group in ([t for t in tensors if len(t) >= 2], [t for t in tensors if len(t) < 2]):
        for t in sorted(group, key=_numel, reverse=True):
            rank = sizes.index(min(sizes))
            sizes[rank] += _numel(t)
            counts[rank] += 1
    worst = max(range(world), key=lambda r: 8 * sizes[r] + 4 * counts[r])
    return sizes[worst], counts[worst]


# ----------------------------------------------------------------------------- activations


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int) -> int:
    """Korthikanti et al. 2022, eq. 1: s·b·h·(34 + 5·a·s/h), 16-bit, no recomputation. For
    comparison only; layer_activation_bytes is what our model saves."""
    return s * b * h * 34 + 5 * a * s * s * b


def layer_activation_bytes(shape: Shape, b: int, s: int, c: int) -> int:
    """Bytes one transformer block saves for backward: sbh·(8 + 14c) + 16·bs + 4·abs."""
    h, a = shape.n_embd, shape.n_head
    per = (8 + 14 * c) * b * s * h + 16 * b * s + 4 * a * b * s
    if shape.dropout > 0:
        per += 2 * b * s * h  # [approx] 1-byte masks of the two residual dropouts
    return per


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch on one GPU."""

    blocks: int
    """Saved by the L blocks: all their activations, or only their inputs when checkpointed."""
    outside: int
    """Saved outside the blocks: ids, final LayerNorm, LM-head input, indices, log-probs."""
    recompute: int
    """Checkpointing only: one block's activations rebuilt during backward."""
    loss_transient: int
    """Logit gradients next to the saved log-probs when backward starts (8·n·V)."""
    cast_weights_saved: int
    """Autocast weight copies that autograd saves (all matmul weights; the LM head's only
    when the blocks are checkpointed, theirs then live in autocast's cache until forward ends)."""

    @property
    def saved(self) -> int:
        """Everything saved for backward that is not a parameter: what a saved_tensors_hooks
        count of non-parameter storages measures after the forward."""
        return self.blocks + self.outside + self.cast_weights_saved


def activations(
    shape: Shape, b: int, s: int, precision: str, checkpointing: bool, supervised_fraction: float = 1.0,
    fsdp: bool = False,
) -> Activations:
    h, V = shape.n_embd, shape.vocab
    c = 2 if precision in HALF else 4
    n = math.ceil(supervised_fraction * b * s)
    layer = layer_activation_bytes(shape, b, s, c)
    half = precision in HALF
    block_copies = half and not fsdp  # under FSDP the blocks' matmul weights are gathered in c
    outside = 8 * b * s + 8 * s + 4 * b * s * h + 8 * b * s + c * n * h + 16 * n + 4 * n * V + 4
    if shape.dropout > 0:
        outside += b * s * h  # [approx] embedding dropout mask
    if checkpointing:
        blocks = shape.n_layer * 4 * b * s * h  # fp32 block inputs: the residual stream
        recompute = layer + (2 * 12 * h * h if block_copies else 0)
        cast_saved = 2 * V * h if half else 0  # the LM head's (the root is fp32 under FSDP too)
    else:
        blocks, recompute = shape.n_layer * layer, 0
        cast_saved = (2 * shape.matmul_weights if block_copies else 2 * V * h) if half else 0
    return Activations(blocks, outside, recompute, 8 * n * V, cast_saved)


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PlanInput:
    """One run to plan. micro_batch is per GPU, as train.micro_batch_size is."""

    shape: Shape
    model: str
    gpu: str
    gpus: int = 1
    strategy: str = "single"
    precision: str = "bf16"
    micro_batch: int = 8
    seq: int = 1024
    grad_accum: int = 1
    activation_checkpointing: bool = False
    gpus_per_node: int | None = None
    """hsdp's shard group (default: min(gpus, 8))."""
    supervised_fraction: float = 1.0
    mfu: float = DEFAULT_MFU
    dataset_tokens: int | None = None
    dataset_source: str = "unknown"
    epochs: int = 3
    reserve_gib: float = DEFAULT_RESERVE_GIB
    fragmentation: float = DEFAULT_FRAGMENTATION

    @property
    def shards(self) -> int:
        """Ranks that share one copy of the sharded state (1 when nothing is sharded that way)."""
        if self.strategy == "hsdp":
            return self.gpus_per_node or min(self.gpus, 8)
        return self.gpus if self.strategy in ("fsdp_full", "fsdp_grad_op", "zero1") else 1

    @property
    def peak_key(self) -> str:
        return GPU_SPECS[self.gpu][0]


def normalize_gpu(name: str) -> str:
    """'A100_40GB', 'a100-40gb' -> 'a100-40gb'; unknown names fail listing the known ones."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key not in GPU_SPECS:
        raise PlanError(f"unknown GPU {name!r}; known: {', '.join(GPU_SPECS)}")
    return key


def resolve_precision(precision: str, gpu: str) -> str:
    """The policy name for this GPU ('auto': bf16 where it has bf16, else fp16), or PlanError."""
    key = GPU_SPECS[gpu][0]
    if precision == "auto":
        return "bf16" if "bf16" in GPU_PEAK_TFLOPS[key] else "fp16"
    if precision not in PRECISIONS:
        raise PlanError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}, auto")
    if precision not in GPU_PEAK_TFLOPS[key]:
        raise PlanError(
            f"the {key} ({gpu}) has no {precision} support: bf16 and TF32 need compute capability >= 8.0 "
            "(Ampere or newer); use --precision fp16 (or auto)"
        )
    return precision


def validate(inp: PlanInput) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise PlanError(msg)

    need(inp.gpu in GPU_SPECS, f"unknown GPU {inp.gpu!r}; known: {', '.join(GPU_SPECS)}")
    need(inp.strategy in STRATEGIES, f"unknown strategy {inp.strategy!r}; known: {', '.join(STRATEGIES)}")
    resolve_precision(inp.precision, inp.gpu)
    need(inp.gpus >= 1, f"--gpus must be >= 1, got {inp.gpus}")
    need(inp.strategy != "single" or inp.gpus == 1,
         f"strategy 'single' runs one process but --gpus is {inp.gpus}; pass --strategy ddp, zero1, fsdp_full, "
         "fsdp_grad_op or hsdp")
    if inp.strategy == "hsdp":
        g = inp.shards
        need(1 <= g <= inp.gpus and inp.gpus % g == 0,
             f"--gpus-per-node {g} must divide --gpus {inp.gpus} (hsdp shards within a node, replicates across nodes)")
    for name in ("micro_batch", "seq", "grad_accum", "epochs"):
        need(getattr(inp, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(inp, name)}")
    need(inp.seq <= inp.shape.block_size, f"--seq {inp.seq} exceeds the model's {inp.shape.block_size} positions")
    need(0.0 <= inp.supervised_fraction <= 1.0, f"--supervised-fraction must be in [0, 1], got {inp.supervised_fraction}")
    need(0.0 < inp.mfu <= 1.0, f"--mfu must be in (0, 1], got {inp.mfu}")
    need(inp.dataset_tokens is None or inp.dataset_tokens > 0, f"--dataset-tokens must be > 0, got {inp.dataset_tokens}")
    need(inp.reserve_gib >= 0 and inp.fragmentation >= 0, "--reserve-gib and --fragmentation must be >= 0")


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU (the most-loaded rank), one field per term of the module docstring.

    The first five are resident through the step; the rest are the working set of the
    backward pass, whose peak is the largest of three moments (`phases`)."""

    params: int
    grads: int
    optimizer: int
    ddp_buckets: int
    unsharded_params: int
    activations: int
    cast_weights: int
    loss_transient: int
    recompute: int
    head_grad: int
    """The tied embedding's LM-head gradient, held by autograd until the embedding's part arrives."""
    block_grads: int
    """FSDP: one block's unsharded gradient and its fp32 reduce-scatter input."""
    embedding_backward: int
    """Held LM-head gradient + the embedding's dense gradient + their sum (FSDP: or the root's
    gradient + its fp32 reduce-scatter input, if larger)."""

    @property
    def resident(self) -> int:
        return self.params + self.grads + self.optimizer + self.ddp_buckets + self.unsharded_params

    @property
    def phases(self) -> dict[str, int]:
        """The backward working set at its three candidate peaks."""
        saved = self.activations + self.cast_weights
        return {
            "backward start (loss)": saved + self.loss_transient,
            "after the LM head": saved + self.recompute + self.head_grad + self.block_grads,
            "embedding backward": self.embedding_backward,
        }

    @property
    def working(self) -> int:
        return max(self.phases.values())

    @property
    def total(self) -> int:
        return self.resident + self.working


def memory(inp: PlanInput) -> Memory:
    shape, S = inp.shape, inp.shards
    n, t, h = shape.n_params, len(shape.tensors()), shape.n_embd
    half = inp.precision in HALF
    fsdp = inp.strategy in FSDP
    c = 2 if half else 4
    unsharded_params = buckets = block_grads = 0
    if fsdp:
        local = fsdp_shard_numel(shape, S)
        params, grads, optimizer = 4 * local, 4 * local, 8 * local + 4 * t
        k = shape.n_layer if inp.strategy == "fsdp_grad_op" else min(2, shape.n_layer)
        # the blocks' matmul weights gathered in c; the root and the blocks' LayerNorms in fp32
        mm, norms = shape.block_params - 4 * h, 4 * h
        unsharded_params = 4 * shape.root_params + k * (c * mm + 4 * norms)
        block_grads = (c + 4) * mm + 8 * norms
        embedding = max(3 * 4 * shape.vocab * h, 8 * shape.root_params)
    else:
        params, grads = 4 * n, 4 * n
        opt_n, opt_t = zero1_rank_load(shape, inp.gpus) if inp.strategy == "zero1" else (n, t)
        optimizer = 8 * opt_n + 4 * opt_t
        buckets = 4 * n if inp.strategy in ("ddp", "zero1") else 0
        embedding = 3 * 4 * shape.vocab * h
    act = activations(shape, inp.micro_batch, inp.seq, inp.precision, inp.activation_checkpointing,
                      inp.supervised_fraction, fsdp)
    # autocast's copies: every matmul weight, or under FSDP the LM head's alone
    cast = (2 * shape.vocab * h if fsdp else 2 * shape.matmul_weights) if half else 0
    return Memory(params, grads, optimizer, buckets, unsharded_params, act.blocks + act.outside, cast,
                  act.loss_transient, act.recompute, 4 * shape.vocab * h, block_grads, embedding)


def needed_bytes(inp: PlanInput, mem: Memory) -> float:
    """What the GPU must have: total x (1 + fragmentation) + reserve."""
    return mem.total * (1 + inp.fragmentation) + inp.reserve_gib * GiB


def fits(inp: PlanInput) -> bool:
    return needed_bytes(inp, memory(inp)) <= GPU_SPECS[inp.gpu][1]


# ----------------------------------------------------------------------------- compute


@dataclass(frozen=True)
class Compute:
    model_flops_per_token: int
    """metrics.flops_per_token: 6·(N - P·h) + 12·L·a·(h/a)·s (what train.py's MFU uses)."""
    flops_per_token: float
    """Executed: x 4/3 under activation checkpointing."""
    tokens_per_step: int
    peak_flops: float
    """Per GPU, for the precision (metrics.GPU_PEAK_TFLOPS)."""
    step_time_s: float
    tokens_per_s: float
    dataset_tokens: int | None
    steps_per_epoch: int | None
    epoch_time_s: float | None
    chinchilla_tokens: int
    """20·N (Hoffmann et al. 2022)."""
    training_tokens: int | None
    """dataset tokens x epochs."""


def compute(inp: PlanInput) -> Compute:
    shape = inp.shape
    model_fpt = flops_per_token(shape.n_params - shape.block_size * shape.n_embd, shape.n_layer, shape.n_head,
                                shape.n_embd // shape.n_head, inp.seq)
    fpt = model_fpt * (4 / 3 if inp.activation_checkpointing else 1)
    tokens = inp.micro_batch * inp.seq * inp.grad_accum * inp.gpus
    peak = GPU_PEAK_TFLOPS[inp.peak_key][inp.precision] * 1e12
    step = tokens * fpt / (inp.gpus * peak * inp.mfu)
    tps = tokens / step
    d = inp.dataset_tokens
    return Compute(
        model_fpt, fpt, tokens, peak, step, tps, d,
        math.ceil(d / tokens) if d else None, d / tps if d else None,
        CHINCHILLA_TOKENS_PER_PARAM * shape.n_params, d * inp.epochs if d else None,
    )


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    input: PlanInput
    memory: Memory
    needed: float
    capacity: int
    compute: Compute
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.needed <= self.capacity

    def to_dict(self) -> dict[str, Any]:
        inp = asdict(self.input)
        inp["shape"] = {**inp["shape"], "n_params": self.input.shape.n_params}
        return {
            "input": {**inp, "shard_group": self.input.shards},
            "memory_bytes": {**asdict(self.memory), "resident": self.memory.resident,
                             "working": self.memory.working, "total": self.memory.total},
            "backward_phases_bytes": self.memory.phases,
            "needed_bytes": round(self.needed),
            "capacity_bytes": self.capacity,
            "fits": self.fits,
            "headroom_bytes": round(self.capacity - self.needed),
            "compute": asdict(self.compute),
            "notes": self.notes,
            "suggestions": self.suggestions,
        }


def make_plan(inp: PlanInput) -> Plan:
    """Validate `inp` (resolving the GPU name and 'auto' precision), then plan it."""
    inp = replace(inp, gpu=normalize_gpu(inp.gpu))
    inp = replace(inp, precision=resolve_precision(inp.precision, inp.gpu))
    validate(inp)
    mem = memory(inp)
    plan = Plan(inp, mem, needed_bytes(inp, mem), GPU_SPECS[inp.gpu][1], compute(inp))
    plan.notes = _notes(inp)
    if not plan.fits:
        plan.suggestions = suggestions(inp)
    return plan


def _notes(inp: PlanInput) -> list[str]:
    notes = []
    if inp.supervised_fraction == 1.0:
        notes.append("LM head and loss sized for every position supervised (--supervised-fraction 1.0, the upper "
                     "bound); with prompt masking fewer rows reach the LM head")
    if inp.grad_accum == 1:
        notes.append("gradients are counted as resident during forward, true from the 2nd micro-batch of an "
                     "accumulated step; with grad-accum 1 the total is an upper bound by up to the gradients")
    if inp.strategy in FSDP:
        notes.append("FSDP's unsharded parameters and block gradients are approximations (block-granular, no "
                     "all-gather padding); measured on CPU within 6 % of the step's peak (docs/planning.md)")
    if inp.strategy in FSDP and inp.precision == "fp16":
        notes.append("fp16 under FSDP uses the unfused AdamW, whose temporaries are not counted")
    if inp.shape.dropout > 0:
        notes.append("dropout > 0: mask bytes are an approximation (not measured)")
    notes.append(f"dataset tokens: {inp.dataset_source}")
    return notes


def suggestions(inp: PlanInput) -> list[str]:
    """Changes that make a run that does not fit, fit (each re-planned)."""
    out = []
    combo: dict[str, Any] = {}
    options = []
    if not inp.activation_checkpointing:
        options.append(("--activation-checkpointing", {"activation_checkpointing": True}))
    if inp.gpus > 1 and inp.strategy not in ("fsdp_full", "hsdp"):
        options.append(("--strategy fsdp_full", {"strategy": "fsdp_full"}))
    if inp.precision not in HALF:
        half = resolve_precision("auto", inp.gpu)
        options.append((f"--precision {half}", {"precision": half}))
    for flag, change in options:
        combo.update(change)
        if fits(replace(inp, **change)):
            out.append(f"{flag} fits ({_gib(memory(replace(inp, **change)).total)} GiB total)")
    if not out and len(options) > 1 and fits(replace(inp, **combo)):
        out.append(" ".join(f for f, _ in options) + f" fits ({_gib(memory(replace(inp, **combo)).total)} GiB total)")
    best = 0
    for label, base in (("", inp), (" ".join(f for f, _ in options) + " ", replace(inp, **combo))):
        mb = 0 if fits(base) else largest_micro_batch(base)
        if mb > best:
            out.append(f"{label}{_micro_batch_flags(inp, mb)} fits")
            best = mb
    if not out:
        out.append("nothing tried here fits: shard over more GPUs (fsdp_full), or use a GPU with more memory")
    return out


def largest_micro_batch(inp: PlanInput) -> int:
    """The largest micro-batch below inp.micro_batch that fits (0: none)."""
    return next((k for k in range(inp.micro_batch - 1, 0, -1) if fits(replace(inp, micro_batch=k))), 0)


def _micro_batch_flags(inp: PlanInput, mb: int) -> str:
    """'--micro-batch mb', plus the largest divisor of the global batch at most mb with the
    grad-accum that keeps the global batch."""
    global_batch = inp.micro_batch * inp.grad_accum
    flags = f"--micro-batch {mb}"
    div = next(k for k in range(mb, 0, -1) if global_batch % k == 0)
    same = f"--micro-batch {div} --grad-accum {global_batch // div}"
    return same if div == mb else f"{flags} (or {same}: same global batch)"


# ----------------------------------------------------------------------------- output


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.2f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.2f} h"
    return f"{s / 86400:.1f} days"


def _memory_rows(inp: PlanInput, mem: Memory) -> list[tuple[str, int, str]]:
    """(label, bytes, formula) of the resident terms, then the backward working set's parts."""
    S, c = inp.shards, ("2 B" if inp.precision in HALF else "4 B")
    fsdp = inp.strategy in FSDP
    shard = f" / {S} (dim-0 shards)" if fsdp else ""
    if inp.strategy == "zero1":
        opt = f"8 B x the most-loaded rank's elements ({S} ranks, whole tensors) + 4 B x its tensors"
    else:
        opt = f"8 B x N{shard} + 4 B x T (step)"
    k = inp.shape.n_layer if inp.strategy == "fsdp_grad_op" else min(2, inp.shape.n_layer)
    if inp.activation_checkpointing:
        act = "L x 4 B x sbh (block inputs) + outside the blocks (ids, ln_f, LM-head input, 4 B x n x V log-probs)"
    else:
        act = f"L x [sbh x (8 + 14 x {c[0]}) + 16bs + 4abs] + outside the blocks (ids, ln_f, LM head, 4 B x n x V)"
    resident = [
        ("fp32 parameters", mem.params, f"4 B x N{shard}"),
        ("fp32 gradients", mem.grads, f"4 B x N{shard}"),
        ("AdamW state (exp_avg, exp_avg_sq, step)", mem.optimizer, opt),
        ("DDP gradient buckets", mem.ddp_buckets, "4 B x N (gradient_as_bucket_view=False)"),
        ("unsharded parameters (FSDP)", mem.unsharded_params,
         f"4 B x root + {k} x ({c} x block matmuls + 4 B x LayerNorms) [approx]"),
    ]
    working = [
        ("  activations saved for backward", mem.activations, act),
        ("  autocast weight copies", mem.cast_weights,
         "2 B x V x h (the LM head)" if fsdp else "2 B x (12h^2 x L + V x h)"),
        ("  loss transient (logit gradients)", mem.loss_transient, "8 B x n x V"),
        ("  recomputed block (checkpointing)", mem.recompute, "one block's activations"),
        ("  LM-head gradient of the tied embedding", mem.head_grad, "4 B x V x h, held until the embedding's"),
        ("  one block's gradient + reduce input", mem.block_grads,
         f"({c} + 4 B) x block matmuls + 8 B x LayerNorms [approx]"),
        ("  embedding backward", mem.embedding_backward, "3 x 4 B x V x h (held + dense + sum)"),
    ]
    return [row for row in resident if row[1]] + [("working set in backward (peak phase)", mem.working, "")] + [
        row for row in working if row[1]]


def _header(inp: PlanInput) -> list[str]:
    shape, (key, cap) = inp.shape, GPU_SPECS[inp.gpu]
    group = f" over {inp.shards}" if inp.strategy in (*FSDP, "zero1") else ""
    ac = "on" if inp.activation_checkpointing else "off"
    n = math.ceil(inp.supervised_fraction * inp.micro_batch * inp.seq)
    return [
        (f"model  {inp.model}: N = {shape.n_params:,} parameters (L={shape.n_layer}, a={shape.n_head}, "
         f"h={shape.n_embd}, V={shape.vocab} padded, P={shape.block_size})"),
        (f"run    {inp.gpus} x {inp.gpu} ({key}, {cap / GiB:.0f} GiB), {inp.strategy}{group}, {inp.precision}, "
         f"micro-batch b={inp.micro_batch} x s={inp.seq}, grad-accum {inp.grad_accum}, "
         f"activation checkpointing {ac}, LM-head rows n={n:,}"),
    ]


def _memory_section(plan: Plan) -> list[str]:
    inp, mem = plan.input, plan.memory
    lines = [f"{'memory per GPU':<42}{'GiB':>8}  formula"]
    lines += [f"  {label:<40}{_gib(b):>8}  {formula}".rstrip() for label, b, formula in _memory_rows(inp, mem)]
    margin = f"+ {inp.fragmentation:.0%} fragmentation + {inp.reserve_gib:.2f} GiB reserve"
    verdict = (f"YES, {_gib(plan.capacity - plan.needed)} GiB headroom" if plan.fits
               else f"NO, short by {_gib(plan.needed - plan.capacity)} GiB")
    phases = ", ".join(f"{name} {_gib(b)}" for name, b in mem.phases.items())
    lines += [
        f"  {'  phases (GiB)':<40}{'':>8}  {phases}",
        f"  {'total':<40}{_gib(mem.total):>8}  resident + peak phase",
        f"  {margin:<40}{_gib(plan.needed):>8}  of {plan.capacity / GiB:.2f} GiB",
        f"  fits: {verdict}",
    ]
    return lines + [f"  try: {s}" for s in plan.suggestions]


def _compute_section(inp: PlanInput, comp: Compute) -> list[str]:
    fpt = f"{comp.model_flops_per_token / 1e9:.3f} GFLOP (6N' + 12·L·a·(h/a)·s, N' = N - P·h)"
    if inp.activation_checkpointing:
        fpt += f" x 4/3 (recomputed forward) = {comp.flops_per_token / 1e9:.3f}"
    lines = [
        "compute",
        f"  FLOPs per token        {fpt}",
        f"  tokens per step        {comp.tokens_per_step:,} (b x s x grad-accum x gpus)",
        (f"  step time              {_duration(comp.step_time_s)} at MFU {inp.mfu:.2f} of "
         f"{comp.peak_flops / 1e12:g} TFLOP/s {inp.precision} per GPU ({comp.tokens_per_s:,.0f} tokens/s)"),
    ]
    if comp.dataset_tokens:
        lines.append(f"  epoch                  {_duration(comp.epoch_time_s)}: {comp.dataset_tokens:,} tokens, "
                     f"{comp.steps_per_epoch:,} steps; {inp.epochs} epochs {_duration(comp.epoch_time_s * inp.epochs)}")
    lines += ["", "chinchilla (Hoffmann et al. 2022, 20 tokens per parameter)",
              f"  compute-optimal pretraining of N: {comp.chinchilla_tokens:,} tokens"]
    if comp.training_tokens:
        lines.append(f"  this fine-tune: {comp.training_tokens:,} tokens ({inp.epochs} epochs) = "
                     f"{comp.training_tokens / comp.chinchilla_tokens:.2%} of it: a scale reference, not a target "
                     "(fine-tuning adapts a pretrained model)")
    return lines


def format_plan(plan: Plan) -> str:
    """The human-readable plan: header, memory table, fit, compute, Chinchilla, notes."""
    sections = [_header(plan.input), _memory_section(plan), _compute_section(plan.input, plan.compute),
                ["notes"] + [f"  - {note}" for note in plan.notes]]
    return "\n\n".join("\n".join(lines) for lines in sections)


# ----------------------------------------------------------------------------- command line


def manifest_tokens(data_cfg) -> tuple[int, int, str] | None:
    """(train tokens, train supervised tokens, directory) of the newest prepared manifest whose
    source location and processing settings match `data_cfg` (the content hash in the cache
    key is not recomputed: the planner reads no data), or None."""
    from .data.prepare import MANIFEST, processing_settings
    from .data.sources import BUNDLED_SAMPLE

    location = str(BUNDLED_SAMPLE) if data_cfg.source == "bundled" else data_cfg.source
    settings = processing_settings(data_cfg)
    best = None
    for path in Path(data_cfg.cache_dir).glob(f"*/{MANIFEST}"):
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            stored = dict(m["settings"])
            hub_split = stored.pop("hub_split", None)
            stored.pop("shard_tokens", None)
            source, train = m["source"], m["splits"]["train"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if source.get("location") != location or stored != settings:
            continue
        if source.get("kind") == "hub" and hub_split != data_cfg.hub_split:
            continue
        candidate = (str(m.get("created_at", "")), train["tokens"], train["supervised_tokens"], str(path.parent))
        best = max(best, candidate) if best else candidate
    return best[1:] if best else None


def _shape_from_config(cfg) -> tuple[Shape, str]:
    m = cfg.model
    common = {"dropout": m.dropout, "pad_vocab_to": m.pad_vocab_to}
    if m.name == "custom":
        gc = GPTConfig(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size, **common)
        return Shape.from_config(gc), f"custom ({cfg.run.name})"
    if m.init == "pretrained":  # the checkpoint fixes the shape: GPT-2's, 1024 positions
        return Shape.named(m.name, **common), m.name
    shape = {k: getattr(m, k) for k in ("n_layer", "n_head", "n_embd") if getattr(m, k) is not None}
    return Shape.named(m.name, block_size=m.block_size, **shape, **common), m.name


def input_from_args(args: argparse.Namespace) -> tuple[PlanInput, list[str]]:
    """A PlanInput from `distrib-gpt plan` arguments: --config values first, explicit flags over them."""
    gpu = normalize_gpu(args.gpu)
    extra: list[str] = []
    v: dict[str, Any] = {}
    if args.config or args.overrides:
        from .config import load_config

        cfg = load_config(args.config, args.overrides)
        v["shape"], v["model"] = _shape_from_config(cfg)
        v.update(precision=cfg.precision, strategy=cfg.parallel.strategy, micro_batch=cfg.train.micro_batch_size,
                 seq=cfg.data.seq_len, grad_accum=cfg.train.grad_accum, epochs=cfg.train.epochs,
                 activation_checkpointing=cfg.parallel.activation_checkpointing)
        if cfg.parallel.hsdp_replicas and args.gpus % cfg.parallel.hsdp_replicas == 0:
            v["gpus_per_node"] = args.gpus // cfg.parallel.hsdp_replicas
        found = manifest_tokens(cfg.data)
        if found:
            tokens, supervised, where = found
            v.update(dataset_tokens=tokens, dataset_source=f"train split of the prepared shards in {where}")
            extra.append(f"mean supervised fraction of that data: {supervised / tokens:.2f} (batches vary; pass "
                         "--supervised-fraction to size the LM head with it)")
        elif cfg.data.source == "databricks/databricks-dolly-15k":
            v.update(dataset_tokens=_dolly_train_tokens(cfg.data.val_fraction), dataset_source=_DOLLY_NOTE)
        else:
            v["dataset_source"] = (f"unknown: no prepared shards of {cfg.data.source!r} in {cfg.data.cache_dir}; "
                                   "run `distrib-gpt prepare` with this config, or pass --dataset-tokens")
    else:
        v.update(dataset_tokens=_dolly_train_tokens(DOLLY_VAL_FRACTION), dataset_source=_DOLLY_NOTE)
    if args.model or "shape" not in v:
        v["shape"], v["model"] = Shape.named(args.model or "gpt2"), args.model or "gpt2"
    flags = {"precision": args.precision, "strategy": args.strategy, "micro_batch": args.micro_batch, "seq": args.seq,
                 "grad_accum": args.grad_accum, "epochs": args.epochs, "gpus_per_node": args.gpus_per_node,
                 "activation_checkpointing": True if args.activation_checkpointing else None}
    v.update({k: val for k, val in flags.items() if val is not None})
    if args.dataset_tokens is not None:
        v.update(dataset_tokens=args.dataset_tokens, dataset_source="--dataset-tokens")
    v.setdefault("strategy", "single" if args.gpus == 1 else "ddp")
    v["precision"] = resolve_precision(v.get("precision", "auto"), gpu)
    inp = PlanInput(gpu=gpu, gpus=args.gpus, supervised_fraction=args.supervised_fraction, mfu=args.mfu,
                    reserve_gib=args.reserve_gib, fragmentation=args.fragmentation, **v)
    return inp, extra


_DOLLY_NOTE = (f"Dolly-15k train split, estimated offline ({DOLLY_15K_TOKENS:,} tokens for all {DOLLY_15K_RECORDS:,} "
               "records with the Dolly template, ±15 %; see DOLLY_15K_TOKENS in distrib_gpt/plan.py)")


def _dolly_train_tokens(val_fraction: float) -> int:
    return round(DOLLY_15K_TOKENS * (1 - val_fraction))


def plan_command(args: argparse.Namespace) -> Plan:
    inp, extra = input_from_args(args)
    plan = make_plan(inp)
    plan.notes += extra
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return plan
