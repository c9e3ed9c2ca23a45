"""Text generation with a KV cache, for original (fp32/bf16) and int8 checkpoints.

    distrib-gpt generate --checkpoint runs/x/checkpoint --instruction "Name three colours."
    distrib-gpt generate --checkpoint runs/x/checkpoint_int8 --prompt "def main(" --temperature 0

The training forward (`GPT.forward`) is left alone: `forward_cached` below runs the same
submodules (`transformer.wte/wpe/h[i].{ln_1,attn.{c_attn,c_proj},ln_2,mlp}/ln_f`, `lm_head`)
itself, writing each layer's keys and values into a cache preallocated to the prompt length
plus `max_new_tokens`, so each new token costs one position of compute instead of the whole
sequence. It calls the modules, never their weights directly, so it works unchanged on a model
whose Linear weights torchao replaced with int8 tensors (see quantize.py).

Prompt rules (the same in the CLI and in `encode_prompt`):

- `--prompt TEXT` is used verbatim; `--instruction` (and `--context`) fill the instruction
  template the model was trained with (`data.template` of the run's config.yaml, else the
  Dolly template), exactly as `distrib_gpt.data.templates.format_prompt` did in training.
  Text is tokenized with `encode_ordinary` (a literal "<|endoftext|>" is plain text), with
  nothing prepended, as in data preparation.
- A prompt of P tokens needs P + max_new_tokens <= block_size (the model's positions).
  Otherwise the command stops with an error (`overlong="error"`, the default) or, with
  `overlong="truncate"`, keeps the LAST block_size - max_new_tokens prompt tokens: the end
  of a template prompt ("### Response:") is what the model must see right before answering.
- An empty (or whitespace-only) prompt or instruction is refused.

Decoding: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k, then
top-p (nucleus: the smallest set of tokens whose probability reaches top_p), then one sample
from a `torch.Generator` seeded with `seed`, so a fixed seed gives the same sample. A row stops
at end-of-text (`stop_at_eot`); the end-of-text token itself is not returned.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .model import GPT
from .tokenizer import EOT_ID, VOCAB_SIZE, gpt2_encoding


class GenerationError(ValueError):
    """Bad generation input (empty or overlong prompt, impossible sampling settings)."""


# ------------------------------------------------------------------------ the cache


@dataclass
class KVCache:
    """Keys and values of every layer, preallocated: (n_layer, B, n_head, max_len, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0  # positions filled so far

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @classmethod
    def allocate(cls, model: GPT, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        c = model.config
        if max_len > c.block_size:
            raise GenerationError(f"a cache of {max_len} positions exceeds the model's block_size={c.block_size}")
        shape = (c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))


def activation_dtype(model: GPT) -> torch.dtype:
    """dtype the residual stream runs in: that of the position embedding, which no
    quantization method touches (fp32 for fp32 and int8 models, bf16 for a bf16 model)."""
    return model.transformer.wpe.weight.dtype


def _attention_cached(attn, x: torch.Tensor, cache: KVCache, layer: int, start: int) -> torch.Tensor:
    """CausalSelfAttention.forward for positions start..start+T-1, attending to the cache."""
    B, T, C = x.shape
    nh = attn.n_head
    hd = C // nh
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k = k.view(B, T, nh, hd).transpose(1, 2)
    v = v.view(B, T, nh, hd).transpose(1, 2)
    end = start + T
    cache.k[layer, :, :, start:end] = k
    cache.v[layer, :, :, start:end] = v
    if start == 0:
        # prefill: exactly the training forward's attention
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
        if T == 1:
            # one new position sees every cached one: no mask needed
            y = F.scaled_dot_product_attention(q, keys, values)
        else:
            # several new positions: query i (absolute start + i) sees keys 0..start + i
            mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    y = y.transpose(1, 2).contiguous().view(B, T, C)
    return attn.c_proj(y)


@torch.no_grad()
def forward_cached(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed tokens idx (B, T) at the cache's next positions; returns the logits (B, vocab_size)
    of the last position (fp32). Call under model.eval() (dropout is skipped here anyway)."""
    T = idx.shape[1]
    start = cache.length
    if start + T > cache.max_len:
        raise GenerationError(f"the cache holds {cache.max_len} positions; cannot add {T} after {start}")
    tr = model.transformer
    pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
    x = tr.wte(idx) + tr.wpe(pos)
    for i, block in enumerate(tr.h):
        x = x + _attention_cached(block.attn, block.ln_1(x), cache, i, start)
        x = x + block.mlp(block.ln_2(x))
    cache.length = start + T
    x = tr.ln_f(x[:, -1, :])  # LayerNorm is per position: only the last one is needed
    return model.lm_head(x)[:, : model.config.vocab_size].float()


@torch.no_grad()
def forward_full(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The reference without a cache: the training forward over the whole sequence, last position."""
    return model(idx)[:, -1, :].float()


# --------------------------------------------------------------------- sampling


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V); see the module docstring for the order."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


@dataclass
class Generation:
    tokens: list[list[int]]
    """New tokens of each row, without the end-of-text token that stopped it."""
    stopped_at_eot: list[bool]
    prefill_s: float
    """Seconds for the prompt's forward (filling the cache) up to the first token's logits."""
    decode_s: float
    """Seconds for everything after: sampling every token and one forward per token after the first."""
    decode_steps: int
    """Single-position forwards run after the prefill (new tokens - 1 unless all rows stopped early)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eot: bool = True,
    use_cache: bool = True,
    eot_id: int = EOT_ID,
) -> Generation:
    """Continue each row of `prompt` (B, T: token ids, rows of equal length) by up to
    `max_new_tokens` tokens. use_cache=False recomputes the whole sequence every step (the
    reference the tests compare the cache against)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise GenerationError(f"the prompt must be a non-empty (batch, tokens) tensor, got shape {tuple(prompt.shape)}")
    B, T = prompt.shape
    block = model.config.block_size
    if T + max_new_tokens > block:
        raise GenerationError(
            f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds the model's {block} positions"
        )
    model.eval()
    device = prompt.device
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)

    _sync(device)
    t0 = time.perf_counter()
    if use_cache:
        cache = KVCache.allocate(model, B, T + max_new_tokens, device, activation_dtype(model))
        logits = forward_cached(model, prompt, cache)
    else:
        seq = prompt
        logits = forward_full(model, seq)
    _sync(device)
    t1 = time.perf_counter()

    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    steps = 0
    while True:
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if stop_at_eot:
            nxt = torch.where(finished, torch.full_like(nxt, eot_id), nxt)
            finished |= nxt == eot_id
        out[:, n] = nxt
        n += 1
        if n == max_new_tokens or (stop_at_eot and bool(finished.all())):
            break
        if use_cache:
            logits = forward_cached(model, nxt[:, None], cache)
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = forward_full(model, seq)
        steps += 1
    _sync(device)
    t2 = time.perf_counter()

    rows = out[:, :n].tolist()
    tokens, stopped = [], []
    for row in rows:
        if stop_at_eot and eot_id in row:
            tokens.append(row[: row.index(eot_id)])
            stopped.append(True)
        else:
            tokens.append(row)
            stopped.append(False)
    return Generation(tokens, stopped, t1 - t0, t2 - t1, steps)


# ---------------------------------------------------------------------- prompts


def build_prompt(prompt: str | None, instruction: str | None, context: str | None, data_cfg) -> str:
    """The text the model continues: `prompt` verbatim, or the training template filled with
    instruction/context (exactly one of prompt / instruction)."""
    from .data.templates import format_prompt

    if prompt is not None and instruction is not None:
        raise GenerationError("give either --prompt or --instruction, not both")
    if prompt is None and instruction is None:
        raise GenerationError("nothing to continue: give --prompt TEXT or --instruction TEXT")
    if context is not None and instruction is None:
        raise GenerationError("--context fills the instruction template; it needs --instruction")
    if prompt is not None:
        if not prompt.strip():
            raise GenerationError("the prompt is empty")
        return prompt
    if not instruction.strip():
        raise GenerationError("the instruction is empty")
    return format_prompt(instruction, context or "", data_cfg)


def encode_prompt(text: str, block_size: int, max_new_tokens: int, overlong: str = "error") -> tuple[list[int], int]:
    """Token ids of `text` under the prompt-length rule; returns (ids, tokens dropped)."""
    if overlong not in ("error", "truncate"):
        raise GenerationError(f"overlong must be 'error' or 'truncate', got {overlong!r}")
    if max_new_tokens >= block_size:
        raise GenerationError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model has {block_size} positions"
        )
    ids = gpt2_encoding().encode_ordinary(text)
    if not ids:
        raise GenerationError("the prompt is empty")
    room = block_size - max_new_tokens
    if len(ids) <= room:
        return ids, 0
    if overlong == "error":
        raise GenerationError(
            f"the prompt has {len(ids)} tokens but the model's {block_size} positions leave room for {room} "
            f"with max_new_tokens={max_new_tokens}; shorten it, lower --max-new-tokens, or pass --overlong truncate"
        )
    return ids[-room:], len(ids) - room


def check_vocabulary(model: GPT, where: str) -> None:
    """GPT-2's tokenizer emits ids up to 50256; a model with fewer rows cannot read them."""
    if model.config.vocab_size < VOCAB_SIZE:
        from .checkpoint import CheckpointError

        raise CheckpointError(
            f"{where}: the model's vocabulary has {model.config.vocab_size} tokens, fewer than GPT-2's {VOCAB_SIZE}"
        )


# ------------------------------------------------------------------ measurement


@torch.no_grad()
def measure_inference(
    model: GPT,
    device: torch.device,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    batch_sizes: tuple[int, ...] = (1, 8),
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Prefill latency (batch 1) and decode tokens/s per batch size: medians over `repeats`
    greedy generations of exactly `new_tokens` tokens (end-of-text does not stop them) from
    a random prompt of `prompt_tokens` tokens (clipped to fit the model's positions)."""
    c = model.config
    new_tokens = max(2, min(new_tokens, c.block_size - 1))
    prompt_tokens = max(1, min(prompt_tokens, c.block_size - new_tokens))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(c.vocab_size, EOT_ID), (max(batch_sizes), prompt_tokens), generator=g).to(device)
    generate(model, ids[:1, : min(8, prompt_tokens)], 2, temperature=0, stop_at_eot=False)  # warm-up
    prefill: list[float] = []
    decode: dict[str, float] = {}
    for b in batch_sizes:
        runs = [generate(model, ids[:b], new_tokens, temperature=0, stop_at_eot=False) for _ in range(repeats)]
        decode[str(b)] = statistics.median(b * r.decode_steps / r.decode_s for r in runs)
        if b == 1:
            prefill = [r.prefill_s for r in runs]
    if not prefill:
        prefill = [generate(model, ids[:1], 2, temperature=0, stop_at_eot=False).prefill_s for _ in range(repeats)]
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_ms_batch1": statistics.median(prefill) * 1e3,
        "decode_tokens_per_s": decode,
    }


# ------------------------------------------------------------------ command line


def generate_command(args) -> Generation:
    """`distrib-gpt generate`: prints the completion of one prompt to stdout."""
    import sys

    from .quantize import command_config, load_model, read_meta, resolve_device

    read_meta(args.checkpoint)  # a missing checkpoint is reported before anything else
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    data_cfg = command_config(args.checkpoint, args.config, args.overrides, need_data=False).data
    text = build_prompt(args.prompt, args.instruction, args.context, data_cfg)
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    check_vocabulary(model, args.checkpoint)
    ids, dropped = encode_prompt(text, model.config.block_size, args.max_new_tokens, args.overlong)
    if dropped:
        print(f"warning: the prompt was cut to its last {len(ids)} tokens ({dropped} dropped)", file=sys.stderr)
    result = generate(
        model, torch.tensor([ids], dtype=torch.long, device=device), args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        use_cache=not args.no_cache,
    )
    print(gpt2_encoding().decode(result.tokens[0]))
    if args.stats:
        n = len(result.tokens[0])
        rate = f"{result.decode_steps / result.decode_s:.1f} tokens/s" if result.decode_steps else "n/a"
        print(
            f"prompt {len(ids)} tokens, prefill {result.prefill_s * 1e3:.1f} ms | {n} new tokens, "
            f"decode {rate} | {'stopped at end-of-text' if result.stopped_at_eot[0] else 'hit max_new_tokens'}",
            file=sys.stderr,
        )
    return result
