"""A GPT-2 language model in one file, in the spirit of nanoGPT's model.py.

Module and parameter names match Hugging Face's ``GPT2LMHeadModel`` so that
state dicts map one to one (only the Conv1D weights need a transpose). Every
projection is a plain ``nn.Linear`` so that later passes (e.g. int8
quantization) can find and replace them.

References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face's PyTorch port: transformers/models/gpt2/modeling_gpt2.py
3) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from distrib_gpt.attention import BACKENDS, DocumentMask, attend, document_mask, resolve_backend

# n_layer, n_head, n_embd of the four released GPT-2 checkpoints.
GPT_SHAPES: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 12, 768),  # 124M params
    "gpt2-medium": (24, 16, 1024),  # 350M params
    "gpt2-large": (36, 20, 1280),  # 774M params
    "gpt2-xl": (48, 25, 1600),  # 1558M params
}

# The fields that fix the shape of the weights. A pretrained checkpoint
# decides these; overriding them would make the weights not fit.
_SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "layer_norm_eps")


@dataclass
class GPTConfig:
    """Hyperparameters of a GPT-2 style model. Defaults are GPT-2 small."""

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, like GPT-2
    layer_norm_eps: float = 1e-5
    # Round the embedding / LM-head row count up to a multiple of this, because
    # matmuls with dimensions that are multiples of 64 run noticeably faster on
    # GPUs (50257 -> 50304). 0 or 1 means no padding.
    pad_vocab_to: int = 64
    # Kernel for document-masked attention (forward with doc_ids): "auto" picks the
    # fastest one for the device, or "sdpa_mask" / "flex" (see attention.py). Plain
    # causal rows (doc_ids=None) always use is_causal SDPA. Not a shape field: any
    # value loads any checkpoint, and old config.json files without it get "auto".
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            # bool is a subclass of int; True is not a sensible layer count.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})"
            )
        if not isinstance(self.pad_vocab_to, int) or isinstance(self.pad_vocab_to, bool) or self.pad_vocab_to < 0:
            raise ValueError(f"GPTConfig.pad_vocab_to must be an int >= 0, got {self.pad_vocab_to!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.attention not in BACKENDS:
            raise ValueError(f"GPTConfig.attention must be one of {BACKENDS}, got {self.attention!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Row count of the embedding and LM head: vocab_size rounded up to pad_vocab_to."""
        if self.pad_vocab_to <= 1:
            return self.vocab_size
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """Config for one of the GPT_SHAPES names; overrides replace any field (shape included)."""
        if name not in GPT_SHAPES:
            raise ValueError(f"unknown GPT-2 model name {name!r}; known names: {', '.join(GPT_SHAPES)}")
        n_layer, n_head, n_embd = GPT_SHAPES[name]
        kwargs = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        kwargs.update(overrides)
        return cls(**kwargs)


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention with a fused q/k/v projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # One matmul produces q, k and v for all heads at once.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # Output projection back into the residual stream.
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # attn_dropout is applied inside scaled_dot_product_attention (dropout_p);
        # the module is kept so that the structure matches HF GPT-2.
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: DocumentMask | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): heads become a batch dimension.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # mask None: causal attention with the fused kernel (flash / memory-efficient
        # where available); otherwise causal within each document (attention.py).
        # Either way the kernel applies the 1/sqrt(head_dim) scale itself.
        y = attend(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)
        # Put the heads back side by side.
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network with a 4x hidden width."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU (HF "gelu_new");
        # the exact erf GELU would shift pretrained outputs slightly.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: DocumentMask | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2 language model with an LM head tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.activation_checkpointing = False  # set by parallel.parallelize
        # Weight tying: the output projection reuses the token embedding matrix
        # (as GPT-2 does). Both names then refer to one Parameter.
        self.lm_head.weight = self.transformer.wte.weight

        self.apply(self._init_weights)
        # GPT-2 paper: scale the init of the projections that write into the
        # residual stream by 1/sqrt(N), N = number of residual additions
        # (two per block), so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # Pad rows are never looked up and their logits are sliced off, so they
        # get no gradient; zero them so they are inert and deterministic.
        with torch.no_grad():
            self.transformer.wte.weight[config.vocab_size :].zero_()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # LayerNorm keeps its default init: weight 1, bias 0.

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; the tied wte/lm_head weight is counted once.

        exclude_embeddings=True subtracts the position embedding (wpe) only,
        as nanoGPT does: wte stays in because it is also the LM head's weight.
        """
        # parameters() already yields a shared Parameter once.
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        return_logits: bool = True,
        target_index: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
        """Logits (B, T, vocab_size) for token ids idx (B, T).

        With targets (B, T) (already shifted; -100 = ignore) it also returns the
        fp32 cross-entropy loss, averaged ("mean") or summed ("sum") over the
        non-ignored targets. The returned logits are a view that skips the pad
        columns; call .contiguous() if you need a dense tensor.

        return_logits=False (what the trainer uses) returns (None, loss) and runs
        the LM head only at positions that have a target. With prompt masking
        most positions have none, and the LM head (n_embd x 50304) is the largest
        matmul of a small GPT-2, so this skips a large share of the work.
        target_index (int64, the flat positions where targets.reshape(-1) != -100,
        as `Batch.target_index` holds them) saves finding them with nonzero(), which
        makes the host wait for the device; it must match targets (not checked, since
        checking would wait too). Only return_logits=False uses it.

        Packed rows hold several examples end to end. doc_ids (B, T; any integer
        dtype, equal within one example, padding may be one more id) makes each token
        attend only to earlier-or-same tokens of its own example, with the kernel
        config.attention picks. position_ids (B, T) index the position embedding
        instead of 0..T-1, so each example can start at position 0 as it would alone
        (values must be < block_size; not checked, since checking would wait too).
        Both None: plain causal attention over the row and positions 0..T-1.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length T={T} exceeds block_size={self.config.block_size}"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if targets is not None and targets.shape != (B, T):
            raise ValueError(f"targets must have shape {(B, T)}, got {tuple(targets.shape)}")
        for name, t in (("doc_ids", doc_ids), ("position_ids", position_ids)):
            if t is not None and t.shape != (B, T):
                raise ValueError(f"{name} must have shape {(B, T)}, got {tuple(t.shape)}")

        if position_ids is None:
            position_ids = torch.arange(T, dtype=torch.long, device=idx.device)
        tok_emb = self.transformer.wte(idx)  # (B, T, n_embd)
        pos_emb = self.transformer.wpe(position_ids)  # (T, n_embd) broadcast over B, or (B, T, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        # One mask for all layers, built for the kernel that will use it.
        mask = None
        if doc_ids is not None:
            dropout_p = self.config.dropout if self.training else 0.0
            mask = document_mask(doc_ids, resolve_backend(self.config.attention, idx.device, dropout_p))
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training:
                # keep only the block's input; recompute its activations in backward
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        x = self.transformer.ln_f(x)

        if targets is None:
            return self._logits(x)[..., : self.config.vocab_size]
        if return_logits:
            logits = self._logits(x)
            flat_logits, flat_targets = logits.flatten(0, 1), targets.reshape(-1)
        else:
            logits = None
            keep = target_index if target_index is not None else (targets != -100).reshape(-1).nonzero().squeeze(1)
            flat_targets = targets.reshape(-1).index_select(0, keep)
            flat_logits = self._logits(x.flatten(0, 1).index_select(0, keep))
        # .float(): the softmax runs in fp32 even when the logits came out of a
        # half-precision autocast region (a no-op if they are fp32 already).
        loss = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=-100, reduction=reduction)
        if logits is not None:
            logits = logits[..., : self.config.vocab_size]
        return logits, loss

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """LM head over the padded vocabulary, pad columns set to -inf.

        The matmul runs over the padded row count (the fast shape). Pad columns
        must never take probability mass: pretrained GPT-2 logits are large
        negative numbers, so a pad column's logit of 0 would dominate. Filling
        them with -inf (rather than slicing them off) keeps the logits
        contiguous for the cross-entropy; their softmax gradient is exactly 0.
        """
        logits = self.lm_head(x)
        if self.config.padded_vocab_size > self.config.vocab_size:
            logits[..., self.config.vocab_size :] = float("-inf")
        return logits

    @classmethod
    def config_from_pretrained(cls, name_or_path: str, **overrides) -> GPTConfig:
        """The GPTConfig of a Hugging Face GPT-2 checkpoint (hub id or local directory),
        validated, without loading its weights: what every FSDP rank needs to build the
        empty model that rank 0 then fills (train.build_parallel_model).

        Only dropout (default 0.0), pad_vocab_to and attention may be overridden;
        the shape comes from the checkpoint.
        """
        allowed = {"dropout", "pad_vocab_to", "attention"}
        known = {f.name for f in fields(GPTConfig)}
        for key in overrides:
            if key in _SHAPE_FIELDS:
                raise ValueError(
                    f"cannot override {key!r} in from_pretrained: it is fixed by the checkpoint {name_or_path!r}"
                )
            if key not in allowed:
                raise ValueError(
                    f"unknown override {key!r} for from_pretrained; allowed: {sorted(allowed)}"
                    + ("" if key in known else f"; GPTConfig fields: {sorted(known)}")
                )

        source = _checkpoint_source(name_or_path)
        # Imported here so that using the model never requires transformers.
        from transformers import AutoConfig

        try:
            # AutoConfig (not GPT2Config) so that model_type reflects the checkpoint.
            hf_config = AutoConfig.from_pretrained(source)
        except OSError as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"could not load GPT-2 config from {name_or_path!r}: {first_line}") from e

        # Refuse checkpoints whose math this implementation does not reproduce.
        if hf_config.model_type != "gpt2":
            raise ValueError(f"{name_or_path!r} is a {hf_config.model_type!r} model, not gpt2")
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(
                f"{name_or_path!r} uses activation_function={hf_config.activation_function!r}; "
                "only the tanh GELU (gelu_new / gelu_pytorch_tanh) is supported"
            )
        if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
            raise ValueError(f"{name_or_path!r} has n_inner={hf_config.n_inner}; only 4 * n_embd is supported")
        if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
            raise ValueError(f"{name_or_path!r} uses a non-standard attention scaling; not supported")

        return GPTConfig(
            block_size=hf_config.n_positions,
            vocab_size=hf_config.vocab_size,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            layer_norm_eps=hf_config.layer_norm_epsilon,
            bias=True,
            **overrides,
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str, **overrides) -> GPT:
        """Load Hugging Face GPT-2 weights from a hub id (e.g. "gpt2") or a local directory.

        Only dropout (default 0.0), pad_vocab_to and attention may be overridden;
        the shape comes from the checkpoint (config_from_pretrained checks both).
        """
        config = cls.config_from_pretrained(name_or_path, **overrides)
        model = cls(config)

        from transformers import GPT2LMHeadModel

        try:
            # transformers reads the same config.json again (already validated above)
            hf_model = GPT2LMHeadModel.from_pretrained(_checkpoint_source(name_or_path))
        except OSError as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"could not load GPT-2 weights from {name_or_path!r}: {first_line}") from e
        hf_sd = hf_model.state_dict()

        # The head must be the embedding (we can only represent tied weights).
        if "lm_head.weight" in hf_sd and not torch.equal(hf_sd["lm_head.weight"], hf_sd["transformer.wte.weight"]):
            raise ValueError(f"{name_or_path!r} has an lm_head not tied to transformer.wte; not supported")

        # HF GPT-2 uses Conv1D, which stores its weight as (in, out): the
        # transpose of nn.Linear's (out, in).
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = model.state_dict()
        expected = set(sd) - {"lm_head.weight"}  # filled through wte (tied)
        filled: set[str] = set()
        with torch.no_grad():
            for key, src in hf_sd.items():
                # Causal-mask buffers of older transformers versions; not weights.
                if key.endswith(".attn.bias") or key.endswith(".attn.masked_bias") or key == "lm_head.weight":
                    continue
                if key not in expected:
                    raise ValueError(f"unexpected key {key!r} in checkpoint {name_or_path!r}")
                if key.endswith(transposed):
                    src = src.t()
                dst = sd[key]
                if key == "transformer.wte.weight":
                    # Real vocabulary into the first rows; pad rows stay zero.
                    dst = dst[: config.vocab_size]
                if src.shape != dst.shape:
                    raise ValueError(
                        f"shape mismatch for {key!r}: checkpoint {tuple(src.shape)}, model {tuple(dst.shape)}"
                    )
                dst.copy_(src)
                filled.add(key)
        missing = sorted(expected - filled)
        if missing:
            raise ValueError(f"checkpoint {name_or_path!r} is missing key {missing[0]!r} ({len(missing)} missing)")
        return model


def _checkpoint_source(name_or_path: str) -> str:
    """What transformers should load: a hub id as given, or an existing local directory."""
    # Something that is unambiguously a filesystem path (absolute, ./, ../,
    # ~) must exist locally; otherwise transformers would treat it as a hub
    # id and fail with a confusing message, possibly after a network wait.
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
    source = os.path.expanduser(name_or_path) if looks_local else name_or_path
    if looks_local and not os.path.isdir(source):
        raise FileNotFoundError(f"GPT-2 checkpoint directory not found: {name_or_path}")
    return source
