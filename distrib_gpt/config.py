"""Run configuration: typed sections, YAML files, dotted command-line overrides.

A run is described by one `Config` made of nested dataclasses. It is loaded from a YAML
file in `configs/` and then patched by `section.key=value` overrides from the command line
(values are parsed as YAML, so `optim.lr=3e-4`, `data.train_on_prompt=true` and
`optim.betas=[0.9,0.95]` all do what they look like). Every key is checked before any work
starts: an unknown key, a value of the wrong type or an impossible value raises
`ConfigError` with a message naming the key.

Each field is documented right under it; `docs/configuration.md` is generated from nothing
else, so this file is the reference.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run directory is `<out_dir>/<name>`."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 1337
    """Seed for model init, dropout and data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks the GPU when one is visible, else the CPU."""
    overwrite: bool = False
    """Allow writing into a run directory that already holds a finished or started run."""


@dataclass
class ModelConfig:
    name: Literal["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "custom"] = "gpt2"
    """A GPT-2 shape, or `custom` to use n_layer/n_head/n_embd below."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """`pretrained` loads Hugging Face GPT-2 weights; `scratch` is GPT-2's random init."""
    pretrained_path: Optional[str] = None
    """Hub id or local directory for `init: pretrained`; default: the model name."""
    n_layer: Optional[int] = None
    """Override the shape (required for `name: custom`)."""
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    block_size: int = 1024
    """Positions the model has (GPT-2: 1024). Must be >= data.seq_len."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residuals; 0 for fine-tuning is usual."""
    pad_vocab_to: int = 64
    """Round the embedding rows up to a multiple of this (50257 -> 50304); 1 = no padding."""
    attention: Literal["auto", "sdpa_mask", "flex"] = "auto"
    """Kernel for rows that carry document ids (each packed example attends only to itself).
    `sdpa_mask`: SDPA with a dense boolean mask (any device, supports dropout). `flex`:
    compiled flex_attention with a block mask (no dropout; no backward on a CPU). `auto`:
    flex on CUDA, sdpa_mask on a CPU or with dropout. Rows without document ids always
    use plain causal SDPA."""


@dataclass
class DataConfig:
    source: str = "bundled"
    """`bundled` (the offline Dolly-schema sample), a local .jsonl/.json/.parquet file,
    or a Hugging Face dataset id such as `databricks/databricks-dolly-15k`."""
    hub_split: str = "train"
    """Split to read when `source` is a hub id."""
    format: Literal["dolly", "alpaca", "columns", "text"] = "dolly"
    """Record schema. `dolly`: instruction/context/response; `alpaca`:
    instruction/input/output; `columns`: names given in `columns`; `text`: plain text
    (no template, no masking) for from-scratch training."""
    columns: dict[str, str] = field(default_factory=dict)
    """For `format: columns`: maps instruction/context/response (or text) to column names."""
    template: Literal["dolly", "alpaca", "custom", "none"] = "dolly"
    """Prompt template. `custom` uses prompt_template / prompt_template_no_context."""
    prompt_template: Optional[str] = None
    """Custom prompt with {instruction} and {context}; the response follows it."""
    prompt_template_no_context: Optional[str] = None
    """Custom prompt with {instruction} only, used when the context is empty."""
    train_on_prompt: bool = False
    """False masks prompt tokens from the loss (labels -100): loss on responses only."""
    seq_len: int = 1024
    """Tokens per training sequence (block)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than seq_len + 1 tokens; the count is reported."""
    val_fraction: float = 0.05
    """Fraction of examples held out for validation (deterministic by split_seed)."""
    split_seed: int = 1234
    """Seed of the train/validation split."""
    max_examples: Optional[int] = None
    """Use only the first N records of the source (after validation), e.g. for smoke runs."""
    batching: Literal["pack", "pack_concat", "pad"] = "pack"
    """`pack`: whole examples placed into rows of seq_len tokens, each attending only to
    itself, at positions from 0 (document-masked; for instruction data). `pack_concat`:
    the same rows read as one text, each example seeing those before it in its row (for
    plain-text pretraining). `pad`: one example per row, length-bucketed, padded to the
    longest in the batch. docs/data.md compares their quality and speed."""
    cache_dir: str = "data_cache"
    """Where `prepare` writes tokenized shards; reused when the manifest matches."""
    shard_tokens: int = 50_000_000
    """Maximum tokens per shard file."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training split."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs when reached first)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    log_every: int = 10
    """Write a metrics.jsonl line every N optimizer steps (and the last one)."""
    max_nonfinite_steps: int = 10
    """Stop with an error after this many consecutive non-finite losses or fp16
    overflow skips."""
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA)."""
    prefetch: int = 2
    """On a GPU: training batches built ahead by a background thread, pinned, and copied to
    the GPU ahead of their step; 0 builds each batch when its step asks for it. On a CPU
    batches are always built in the step's thread: the cores a background thread would use
    are busy with the step (measured: prefetching there cost ~4% of tokens/s, within noise
    of nothing gained)."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warmup steps (capped at the total step count)."""
    weight_decay: float = 0.1
    """AdamW decay, applied to 2-D weights only (not biases, LayerNorms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    fused: Literal["auto", "on", "off"] = "auto"
    """Fused AdamW kernel: `auto` uses it where the device supports it."""


@dataclass
class EvalConfig:
    train_subset_batches: Optional[int] = 50
    """Batches of the training split used for the per-epoch train loss; null = all."""
    val_batches: Optional[int] = None
    """Batches of the validation split per evaluation; null = all."""
    batch_size: Optional[int] = None
    """Evaluation batch size; default: train.micro_batch_size."""


@dataclass
class MetricsConfig:
    tensorboard: bool = False
    """Also write TensorBoard event files into the run directory (needs `tensorboard`)."""


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None
    """Save a sharded, resumable checkpoint every N optimizer steps (null: never mid-epoch)."""
    every_epoch: bool = True
    """Save a sharded, resumable checkpoint at the end of every epoch."""
    keep_last: int = 2
    """How many complete sharded checkpoints to keep (older ones are deleted)."""
    save_final: bool = True
    """Write the consolidated final checkpoint (safetensors + config.json)."""
    export_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the tensors in the consolidated checkpoint."""


@dataclass
class ParallelConfig:
    strategy: Literal["single", "ddp", "zero1", "fsdp_full", "fsdp_grad_op", "hsdp"] = "single"
    """How the model is spread over the processes that torchrun starts (see
    distrib_gpt/parallel.py): `single` (one process), `ddp`, `zero1` (DDP + sharded optimizer
    state), `fsdp_full` (FSDP2, parameters resharded after forward: ZeRO-3), `fsdp_grad_op`
    (FSDP2, parameters kept after forward: ZeRO-2-like), `hsdp` (replicate across nodes,
    shard within a node)."""
    reduce_dtype: Literal["fp32", "param"] = "fp32"
    """FSDP gradient reduction dtype: `fp32` (default, exact sums) or `param` (the policy's
    compute dtype: half the bytes on the wire)."""
    hsdp_replicas: Optional[int] = None
    """HSDP replica groups (default: the number of nodes, WORLD_SIZE / LOCAL_WORLD_SIZE)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of storing them."""
    compile: bool = False
    """torch.compile each transformer block."""
    timeout_s: int = 600
    """Collective timeout: a rank stuck this long in a collective fails the job instead of
    hanging it."""


@dataclass
class LoRAConfig:
    enabled: bool = False
    """Train low-rank adapters (distrib_gpt/lora.py) instead of all weights: the chosen Linear
    layers are frozen and get W + (alpha/rank)·B·A; only A and B are in the optimizer."""
    rank: int = 8
    """Rank r of each adapter pair (A: r x in, B: out x r)."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapter's input (not on the frozen path)."""
    targets: list[str] = field(default_factory=lambda: ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
    """Which Linear layers of every block get adapters: any of attn.c_attn (qkv), attn.c_proj,
    mlp.c_fc, mlp.c_proj."""
    train_bias: bool = False
    """Also train the biases of the adapted layers (tiny; off like LoRA's paper)."""
    save_adapters_only: bool = False
    """Sharded (resumable) checkpoints hold the adapters and their optimizer state but not the
    frozen base weights, which resume rebuilds from model.init. The final consolidated
    checkpoint always holds merged weights."""


@dataclass
class QuantizeConfig:
    after_training: bool = False
    """When training ends, rank 0 quantizes the final consolidated checkpoint into
    `checkpoint_int8/` and writes `quant_summary.json` into the run directory (needs
    checkpoint.save_final). `distrib-gpt quantize` does the same for any checkpoint."""
    method: Literal["int8_dynamic", "int8_weight_only", "int8_static"] = "int8_dynamic"
    """torchao recipe (`quantize_`). `int8_dynamic`: int8 weights (symmetric, one scale per
    output channel), activations quantized per token on the fly. `int8_weight_only`: int8
    weights, floating-point activations. `int8_static`: int8 weights and one activation scale
    per layer calibrated on `calib_examples` training examples (verified on CPU only; the
    tied LM head keeps dynamic activations, see docs/inference.md)."""
    lm_head: bool = True
    """Also quantize the LM head. It is tied to the token embedding, so one int8 matrix (a
    scale per vocabulary row) serves both. false keeps both in floating point: for GPT-2 124M
    the file is then about half of fp32 instead of about a quarter."""
    skip: list[str] = field(default_factory=list)
    """Linear layers kept in floating point: module names or fnmatch patterns, e.g.
    `transformer.h.0.*` or `*.mlp.c_proj`. The position embedding, LayerNorms and biases are
    never quantized."""
    gate_rel_loss: Optional[float] = 0.01
    """Fail the command when the int8 model's mean validation token loss exceeds fp32's by
    more than this fraction (0.01 = 1%); null disables the gate. The figures and the int8
    checkpoint are written either way."""
    calib_examples: int = 64
    """Training examples (the first N, stored order) that calibrate `int8_static`."""
    val_batches: Optional[int] = None
    """Validation batches for the fp32 vs int8 loss comparison; null = eval.val_batches. Both
    models are evaluated on `device`. On CPUs without VNNI/AMX `int8_weight_only` and
    `int8_static` are slower than fp32 (`int8_dynamic` runs on fbgemm there and is faster; see
    docs/inference.md): cap this for large models and validation sets."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where the models are evaluated and timed; `auto` picks the GPU when one is visible."""
    measure: bool = True
    """Time prefill and decode and measure the peak memory of the original and the int8
    model (one fresh process each), into quant_summary.json's `inference`."""
    measure_prompt_tokens: int = 128
    """Prompt length for the timing (clipped to the model's positions)."""
    measure_new_tokens: int = 32
    """Tokens generated per timed run (greedy, end-of-text does not stop them)."""
    measure_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    """Batch sizes whose decode tokens/s are measured."""
    measure_repeats: int = 3
    """Timed runs per batch size; medians are reported."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    precision: Literal["fp32", "tf32", "fp16", "bf16", "auto"] = "fp32"
    """Precision policy (see distrib_gpt/precision.py): fp32, tf32, fp16, bf16 or auto."""
    resume: Optional[str] = None
    """`auto`: continue from this run's latest checkpoint if there is one (else start);
    a path: a checkpoint directory, or a run directory whose latest checkpoint to continue."""

    # ------------------------------------------------------------------ derived
    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------- typing


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_check_type(k, args[0], key): _check_type(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; accept numbers written that way
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # pragma: no cover


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown_key(key: str, known: typing.Iterable[str]) -> ConfigError:
    known = list(known)
    leaf = key.rsplit(".", 1)[-1]
    hint = difflib.get_close_matches(leaf, known, n=1)
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    tail = f" (did you mean '{parent}{hint[0]}'?)" if hint else f" (known: {', '.join(known)})"
    return ConfigError(f"unknown config key '{key}'{tail}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise _unknown_key(full, fields)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _check_type(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: typing.Sequence[str]) -> list[tuple[str, Any]]:
    """`["optim.lr=3e-4", ...]` -> `[("optim.lr", 0.0003), ...]` (values parsed as YAML)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
        out.append((key, value))
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides, validate everything."""
    tree: dict = _read_yaml(Path(path)) if path is not None else {}
    try:  # check the file on its own first, so its errors name the file
        _build(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Cross-field and range checks; each failure names the key."""
    m, d, t, o, e = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.eval
    _require(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", "must be a non-empty name without '/'")
    if m.name == "custom":
        for k in ("n_layer", "n_head", "n_embd"):
            _require(getattr(m, k) is not None, f"model.{k}", "is required when model.name is 'custom'")
        _require(m.init == "scratch", "model.init", "a custom shape can only be trained from scratch")
    for k in ("n_layer", "n_head", "n_embd"):
        v = getattr(m, k)
        _require(v is None or v > 0, f"model.{k}", f"must be positive, got {v}")
    if m.n_embd is not None and m.n_head is not None:
        _require(m.n_embd % m.n_head == 0, "model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}")
    if m.init == "pretrained":
        for k in ("n_layer", "n_head", "n_embd"):
            _require(getattr(m, k) is None, f"model.{k}", "cannot change the shape of a pretrained model")
    _require(m.block_size > 0, "model.block_size", f"must be positive, got {m.block_size}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.pad_vocab_to >= 1, "model.pad_vocab_to", f"must be >= 1, got {m.pad_vocab_to}")
    _require(m.attention != "flex" or m.dropout == 0.0, "model.attention", "'flex' has no dropout; set model.dropout to 0")

    _require(cfg.train.prefetch >= 0, "train.prefetch", f"must be >= 0, got {cfg.train.prefetch}")
    _require(d.seq_len >= 2, "data.seq_len", f"must be >= 2, got {d.seq_len}")
    _require(d.seq_len <= m.block_size, "data.seq_len", f"{d.seq_len} exceeds model.block_size={m.block_size}")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _require(d.max_examples is None or d.max_examples > 0, "data.max_examples", "must be positive")
    _require(d.shard_tokens > 0, "data.shard_tokens", "must be positive")
    if d.format == "columns":
        _require(bool(d.columns), "data.columns", "is required when data.format is 'columns'")
        allowed = {"instruction", "context", "response", "text", "category"}
        for k in d.columns:
            _require(k in allowed, f"data.columns.{k}", f"unknown field; use {sorted(allowed)}")
        has_text = "text" in d.columns
        _require(
            has_text or {"instruction", "response"} <= set(d.columns),
            "data.columns",
            "needs 'instruction' and 'response' (or 'text')",
        )
    elif d.columns:
        raise ConfigError("data.columns: only used with data.format 'columns'")
    if d.template == "custom":
        _require(d.prompt_template is not None, "data.prompt_template", "is required when data.template is 'custom'")
        _require("{instruction}" in (d.prompt_template or ""), "data.prompt_template", "must contain {instruction}")
    if d.format == "text" and d.train_on_prompt is False:
        pass  # plain text has no prompt; every token is trained on (documented)

    _require(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    _require(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    _require(t.log_every >= 1, "train.log_every", "must be >= 1")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")

    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    _require(o.eps > 0, "optim.eps", "must be positive")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")

    c = cfg.checkpoint
    _require(c.every_steps is None or c.every_steps >= 1, "checkpoint.every_steps", "must be >= 1 or null")
    _require(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
    p = cfg.parallel
    _require(p.timeout_s >= 1, "parallel.timeout_s", "must be >= 1")
    _require(p.hsdp_replicas is None or p.hsdp_replicas >= 1, "parallel.hsdp_replicas", "must be >= 1")

    qz = cfg.quantize
    if qz.after_training:
        _require(cfg.checkpoint.save_final, "quantize.after_training", "needs checkpoint.save_final=true (it quantizes the final checkpoint)")
    for i, pat in enumerate(qz.skip):
        _require(bool(pat.strip()), f"quantize.skip[{i}]", "must be a non-empty layer name or pattern")
    _require(qz.gate_rel_loss is None or qz.gate_rel_loss >= 0, "quantize.gate_rel_loss", f"must be >= 0 or null, got {qz.gate_rel_loss}")
    _require(qz.calib_examples >= 1, "quantize.calib_examples", f"must be >= 1, got {qz.calib_examples}")
    _require(qz.val_batches is None or qz.val_batches >= 1, "quantize.val_batches", "must be >= 1 or null")
    _require(qz.measure_prompt_tokens >= 1, "quantize.measure_prompt_tokens", f"must be >= 1, got {qz.measure_prompt_tokens}")
    _require(qz.measure_new_tokens >= 2, "quantize.measure_new_tokens", f"must be >= 2, got {qz.measure_new_tokens}")
    _require(
        bool(qz.measure_batch_sizes) and all(b >= 1 for b in qz.measure_batch_sizes),
        "quantize.measure_batch_sizes", f"must be a non-empty list of sizes >= 1, got {qz.measure_batch_sizes}",
    )
    _require(qz.measure_repeats >= 1, "quantize.measure_repeats", f"must be >= 1, got {qz.measure_repeats}")

    lo = cfg.lora
    _require(lo.rank >= 1, "lora.rank", f"must be >= 1, got {lo.rank}")
    _require(lo.alpha > 0, "lora.alpha", f"must be positive, got {lo.alpha}")
    _require(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    lora_targets = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    _require(bool(lo.targets), "lora.targets", f"must name at least one of {list(lora_targets)}")
    for i, target in enumerate(lo.targets):
        _require(target in lora_targets, f"lora.targets[{i}]", f"{target!r} is not one of {list(lora_targets)}")

    _require(e.train_subset_batches is None or e.train_subset_batches >= 1, "eval.train_subset_batches", "must be >= 1 or null")
    _require(e.val_batches is None or e.val_batches >= 1, "eval.val_batches", "must be >= 1 or null")
    _require(e.batch_size is None or e.batch_size >= 1, "eval.batch_size", "must be >= 1 or null")


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    os.replace(tmp, path)
