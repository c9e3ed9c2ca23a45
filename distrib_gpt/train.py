"""The training recipe: config -> data -> model -> train loop -> metrics -> checkpoint.

Run it as `distrib-gpt train --config configs/quickstart.yaml [section.key=value ...]` or
`python -m distrib_gpt.train --config ...`. What it does, and the key that controls it:

- data: tokenized shards are prepared (or reused) from `data.*`; batches are packed or
  padded (`data.batching`), with prompt tokens masked unless `data.train_on_prompt`;
- model: GPT-2 of `model.name`, pretrained or from scratch (`model.init`);
- precision: the policy from `precision` (fp32/tf32/fp16/bf16/auto), see precision.py;
- optimisation: AdamW + warmup/cosine (`optim.*`), `train.grad_accum` micro-batches per
  step, `train.epochs` or `train.max_steps`;
- evaluation: train (subset) and validation loss before training and after every epoch;
- outputs in `run.out_dir/run.name`: config.yaml, metrics.jsonl, summary.json, checkpoint/.

The step's loss is normalised by the number of supervised tokens in the whole accumulated
step, so a step over several micro-batches computes exactly the gradient of one big batch
(averaging per-micro-batch means would overweight micro-batches with few response tokens).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from . import metrics as M
from .checkpoint import Checkpointer, resolve_resume, save_adapter, save_consolidated
from .config import Config, ConfigError, save_config
from .data import BatchLoader, DataError, Prepared, TokenizedSplit, prepare_data
from .data.loader import PLAN_VERSION, Batch, Prefetcher
from .distributed import (
    DistInfo,
    all_reduce,
    all_reduce_tensor,
    barrier,
    broadcast_error,
    gather_objects,
    init_distributed,
    launch_info,
    launched_by_torchrun,
    shutdown,
)
from .lora import adapter_state_dict, apply_lora, is_adapter_key, merge_state_dict, trainable_summary
from .model import GPT, GPTConfig
from .optim import build_optimizer, lr_at, set_lr
from .parallel import (
    FSDP_STRATEGIES,
    Parallelized,
    check_strategy,
    fsdp_comm_bytes_per_step,
    full_state_dict,
    gradient_sync,
    grad_norm_to_tensor,
    load_full_state_dict,
    parallelize,
)
from .precision import PrecisionPolicy, resolve_precision


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite losses)."""


# ----------------------------------------------------------------------------- setup


def model_config(cfg: Config) -> GPTConfig:
    """The GPTConfig of `cfg.model`: the checkpoint's shape for pretrained init (its config
    only, no weights), else the named or custom shape. Checked against data.seq_len."""
    m = cfg.model
    common = dict(dropout=m.dropout, pad_vocab_to=m.pad_vocab_to, attention=m.attention)
    if m.init == "pretrained":
        config = GPT.config_from_pretrained(m.pretrained_path or m.name, **common)
        if config.block_size < cfg.data.seq_len:
            raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the pretrained model's {config.block_size} positions")
        return config
    shape = {k: getattr(m, k) for k in ("n_layer", "n_head", "n_embd") if getattr(m, k) is not None}
    if m.name == "custom":
        return GPTConfig(**shape, block_size=m.block_size, **common)
    return GPTConfig.from_name(m.name, **shape, block_size=m.block_size, **common)


def build_model(cfg: Config) -> GPT:
    """The model of `cfg.model` with its initial weights: the pretrained checkpoint's, or
    GPT-2's init from the current RNG state."""
    config = model_config(cfg)
    if cfg.model.init == "pretrained":
        m = cfg.model
        return GPT.from_pretrained(m.pretrained_path or m.name, dropout=config.dropout,
                                   pad_vocab_to=config.pad_vocab_to, attention=config.attention)
    return GPT(config)


def build_parallel_model(cfg: Config, policy: PrecisionPolicy, info: DistInfo, device: torch.device, log) -> Parallelized:
    """The model of `cfg.model`, with LoRA adapters if enabled, wrapped for the strategy, with
    the initial weights one process would start from, on every rank.

    FSDP/HSDP: no rank ever holds the whole model on its device. Every rank builds the model
    on the meta device (shapes, no storage), shards it and allocates only its own shards;
    rank 0 alone builds the initial weights, on its CPU, and they are sent into the shards
    (so gpt2-xl starts on GPUs that cannot hold it whole). Other strategies replicate the
    model: every rank builds it and then wraps it."""
    fsdp = cfg.parallel.strategy in FSDP_STRATEGIES

    def initial_model() -> GPT:
        # the same RNG sequence whatever the strategy: seed, GPT init, then the LoRA adapters
        # (on the CPU, so their init never depends on the device)
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg)
        if cfg.lora.enabled:  # freezes the model and adds adapters (before wrapping: FSDP shards them with their block)
            apply_lora(model, cfg.lora)
        return model

    if fsdp:
        # every rank reads the config (a pretrained checkpoint's too); only rank 0 reads weights
        with torch.device("meta"):  # shapes only, no storage
            model = GPT(model_config(cfg))
            if cfg.lora.enabled:
                apply_lora(model, cfg.lora)
    else:
        model = initial_model().to(device)
    if cfg.lora.enabled:
        trainable, total = trainable_summary(model)
        log(f"lora: rank {cfg.lora.rank} on {len(cfg.lora.targets) * model.config.n_layer} layers | "
            f"trainable {trainable:,} of {total:,} ({trainable / total:.2%})")
    par = parallelize(model, cfg.parallel, policy, info, device)
    if fsdp:
        par.model.to_empty(device=device)  # this rank's shards only, uninitialised
        load_full_state_dict(par, initial_model().state_dict() if info.rank == 0 else {})
    # every rank, whatever the path, leaves in the same RNG state (dropout stays deterministic)
    torch.manual_seed(cfg.run.seed)
    return par


def check_run_dir(cfg: Config, resuming: bool = False) -> None:
    """Refuse, before any work, to write into a directory that holds another run."""
    run_dir = cfg.run_dir
    if resuming or cfg.run.overwrite or not (run_dir.exists() and any(run_dir.iterdir())):
        return
    if cfg.resume == "auto" and not (run_dir / "summary.json").exists():
        return  # a start that died before its first checkpoint (e.g. an elastic restart): begin again
    raise ConfigError(
        f"run.name: run directory {run_dir} already exists and is not empty; "
        "choose another run.name, pass run.overwrite=true, or resume=auto to continue it"
    )


def check_resumable(state: dict, cfg: Config, global_batch: int, manifest_key: str) -> None:
    """A resumed run must be the same run: same data, same global batch (any strategy and
    world size that multiply out to it)."""
    same = {
        "data_manifest_key": (state.get("data_manifest_key"), manifest_key, "data.*"),
        "global_batch_sequences": (state.get("global_batch_sequences"), global_batch, "train.micro_batch_size x train.grad_accum x world size"),
        "batching": (state.get("batching"), cfg.data.batching, "data.batching"),
        "seed": (state.get("seed"), cfg.run.seed, "run.seed"),
    }
    for name, (saved, now, keys) in same.items():
        if saved != now:
            raise ConfigError(f"resume: the checkpoint has {name}={saved} but this run has {now} (set by {keys})")
    # checkpoints from before PLAN_VERSION 2 packed by cutting one stream into blocks:
    # their epoch plan no longer exists, so the batches after the checkpoint cannot be replayed
    if cfg.data.batching != "pad" and state.get("batch_plan", 1) != PLAN_VERSION:
        raise ConfigError(
            f"resume: the checkpoint was made with the packing of batch plan {state.get('batch_plan', 1)} "
            f"(examples cut across blocks), this version packs whole examples (plan {PLAN_VERSION}); "
            "its remaining batches cannot be replayed exactly: start a new run"
        )


def create_run_dir(cfg: Config, resumed_step: Optional[int] = None) -> Path:
    """Rank 0: a fresh run directory, or the resumed run's, with metrics.jsonl cut back to
    the checkpoint's step so the curve continues without repeated steps."""
    run_dir = cfg.run_dir
    if resumed_step is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # check_run_dir allowed it: empty, run.overwrite or resume=auto
        run_dir.mkdir(parents=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)  # resume=PATH may start a new run directory
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            keep = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
            tmp = metrics.with_name("metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, metrics)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


# ------------------------------------------------------------------------ the step


@dataclass
class StepResult:
    loss: float  # mean token loss of the step
    grad_norm: float
    real_tokens: int
    pad_tokens: int
    supervised_tokens: int
    skipped: bool  # the optimizer did not step (fp16 overflow or non-finite loss)


def train_step(
    model: GPT,
    micro_batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    policy: PrecisionPolicy,
    scaler: Optional[torch.amp.GradScaler],
    grad_clip: float,
    device: torch.device,
    par: Optional[Parallelized] = None,
    info: DistInfo = DistInfo(),
    n_global: Optional[int] = None,
) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation) on this rank.

    `model` is the module to call (the DDP/FSDP wrapper under a distributed strategy, whose
    `Parallelized` record is `par`). `n_global` is the step's supervised-token count over all
    ranks; the training loop takes it from the loader's plan (no collective, no host sync
    before the forward); without it, it is all-reduced here.

    The step has one host sync, at the end (loss and gradient norm), and takes its
    decisions from those two numbers."""
    par = par or Parallelized(model, model, "single")
    if n_global is None:
        (n_global,) = all_reduce(info, [sum(b.n_supervised for b in micro_batches)])
    # the objective is the mean token loss over every supervised token of the step on every
    # rank. DDP and FSDP average gradients over ranks (divide by W), so each rank's loss is
    # (its token-loss sum) * W / N_global: the average of those is sum / N_global.
    scale = info.world_size / max(n_global, 1)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        with gradient_sync(par, sync=i == len(micro_batches) - 1):
            with policy.autocast():
                _, loss = model(batch.input_ids, batch.labels, reduction="sum", return_logits=False, **batch.model_inputs())
            loss_sum += loss.detach().double()
            loss = loss * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()

    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = grad_norm_to_tensor(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf))
    loss_sum = all_reduce_tensor(info, loss_sum)
    loss_value, norm_value = torch.stack([loss_sum / max(n_global, 1), grad_norm.double()]).tolist()  # the one sync

    # A non-finite gradient norm means some gradient is inf or nan, which is exactly when
    # fp16's GradScaler skips the update (its found_inf check over the same unscaled
    # gradients), so the skip is known here without reading the scale back (another sync).
    # Never let a non-finite loss move the weights either (the same decision on every rank).
    skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
    if scaler is not None:
        if math.isfinite(loss_value):
            scaler.step(optimizer)  # skips the update itself if any gradient is inf/nan
            scaler.update()
        else:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    elif not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=loss_value,
        grad_norm=norm_value,
        real_tokens=sum(b.n_real_tokens for b in micro_batches),
        pad_tokens=sum(b.n_pad for b in micro_batches),
        supervised_tokens=int(n_global),
        skipped=skipped,
    )


@torch.no_grad()
def evaluate(
    model: GPT,
    loader: BatchLoader,
    max_batches: Optional[int],
    policy: PrecisionPolicy,
    device: torch.device,
    info: DistInfo = DistInfo(),
) -> float:
    """Mean token loss over the supervised tokens of the first `max_batches` global batches
    (all of them if None), each rank evaluating its share."""
    was_training = model.training
    model.eval()
    limit = loader.global_batches() if max_batches is None else min(max_batches, loader.global_batches())
    per_rank = -(-limit // info.world_size)  # the same on every rank (FSDP needs lockstep)
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for j, batch in enumerate(loader):
        if j >= per_rank:
            break
        batch = batch.to(device, non_blocking=True)
        with policy.autocast():
            _, loss = model(batch.input_ids, batch.labels, reduction="sum", return_logits=False, **batch.model_inputs())
        if info.rank + j * info.world_size < limit:  # not one of the repeats that pad the list
            total += loss.double()
            count += batch.n_supervised
    model.train(was_training)
    total_all, count_all = all_reduce(info, [total.item(), count])
    return total_all / max(count_all, 1)


def micro_batch_groups(loader: Iterable[Batch], grad_accum: int) -> Iterator[list[Batch]]:
    """Group an epoch's micro-batches into optimizer steps (the last one may be shorter)."""
    group: list[Batch] = []
    for batch in loader:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group


# ------------------------------------------------------------------------- the run


def _prepare_shared(cfg: Config, info: DistInfo, log) -> Prepared:
    """Tokenize once per node (local rank 0), then let the other ranks reuse the shards.
    A failure on the preparing rank is shared with all ranks, so they stop together."""
    prepared, error = None, None
    if info.local_rank == 0:
        try:
            prepared = prepare_data(cfg.data, log=log)
        except DataError as e:
            error = str(e)
    error = broadcast_error(info, error)  # also a barrier: the shards exist after it
    if error:
        raise DataError(error)
    return prepared or prepare_data(cfg.data, log=lambda *a: None)


def train(cfg: Config) -> dict:
    """Run a whole training job; returns the summary (rank 0 also writes summary.json)."""
    started = time.perf_counter()
    info, device = init_distributed(cfg.run.device, cfg.parallel.timeout_s)
    summary = _train(cfg, info, device, started)
    # only on success: after a failure a peer may be gone, and tearing the group down would
    # wait for it; the process is about to exit and torchrun cleans up
    shutdown(info)
    if info.is_main and cfg.quantize.after_training:
        # int8 conversion after the process group is gone: the other ranks have exited, so
        # none waits in a collective (with its timeout) while rank 0 converts a large model
        from .quantize import quantize_after_training

        quantize_after_training(cfg, cfg.run_dir, log=print)  # checkpoint_int8/ + quant_summary.json
    return summary


def _train(cfg: Config, info: DistInfo, device: torch.device, started: float) -> dict:
    phases = M.Phases(device, started)  # "setup" until the first evaluation
    check_strategy(cfg.parallel, info)
    policy = resolve_precision(cfg.precision, device)
    policy.apply_backend_flags()
    resume_from = resolve_resume(cfg.resume, cfg.run_dir)
    check_run_dir(cfg, resuming=resume_from is not None)
    main = info.is_main
    log = print if main else (lambda *a, **k: None)  # only rank 0 logs and writes files
    environment = M.environment()  # imports transformers: counted in set-up, not after the last phase

    prepared = _prepare_shared(cfg, info, log)
    train_split = TokenizedSplit.open(prepared.dir, "train")
    val_split = TokenizedSplit.open(prepared.dir, "val")
    d, t = cfg.data, cfg.train
    ranks = dict(rank=info.rank, world_size=info.world_size)
    loader = BatchLoader(train_split, d.batching, d.seq_len, t.micro_batch_size, seed=cfg.run.seed, **ranks)
    eval_bs = cfg.eval.batch_size or t.micro_batch_size
    train_eval = BatchLoader(train_split, d.batching, d.seq_len, eval_bs, seed=cfg.run.seed, shuffle=False, **ranks)
    val_eval = BatchLoader(val_split, d.batching, d.seq_len, eval_bs, seed=cfg.run.seed, shuffle=False, **ranks)

    par = build_parallel_model(cfg, policy, info, device, log)
    model = par.inner
    n_params = model.num_params() - sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n))  # the base model
    mc = model.config
    step_flops = M.training_flops_fn(model)  # executed matmul FLOPs of a batch's work (metrics.py)
    sharded = cfg.parallel.strategy in FSDP_STRATEGIES
    # torch 2.13's ShardedGradScaler hands the fused AdamW kernel a found_inf of shape [1]
    # where it expects a scalar, so fp16 under FSDP uses the (foreach) unfused AdamW
    optimizer = build_optimizer(
        par.model, cfg.optim, device, zero1=cfg.parallel.strategy == "zero1",
        allow_fused=not (sharded and policy.grad_scaling),
    )
    scaler = policy.make_grad_scaler(sharded=sharded)
    global_batch = t.micro_batch_size * t.grad_accum * info.world_size
    ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint.keep_last, info.rank, info.world_size, device,
                        adapters_only=cfg.lora.enabled and cfg.lora.save_adapters_only)
    resumed = None
    if resume_from is not None:
        resumed = ckpt.load(resume_from, par.model, optimizer)
        check_resumable(resumed, cfg, global_batch, prepared.manifest["key"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        log(f"resuming from {resume_from} (step {resumed['step']}, epoch {resumed['epoch']}, step in epoch {resumed['step_in_epoch']})")
    # everything that can fail on bad input (config, data, model, precision) has been
    # checked by now, so a failed start leaves no run directory behind
    if main:
        create_run_dir(cfg, resumed["step"] if resumed else None)
        for partial in ckpt.clean_partial():
            log(f"removed an incomplete checkpoint: {partial}")
    run_dir = cfg.run_dir

    steps_per_epoch = math.ceil(len(loader) / t.grad_accum)
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    # every rank measures its own peak (on a CPU, all ranks at once: they share the cores
    # as they will in training); the job's MFU divides by the sum
    peak, peak_source = M.peak_flops(device, policy.name, policy.compute_dtype)
    log(
        f"run {run_dir} | {cfg.parallel.strategy} x {info.world_size} | {device.type} | precision {policy.name} | "
        f"params {n_params / 1e6:.1f}M | global batch {global_batch} x {d.seq_len} | "
        f"{len(loader)} micro-batches per rank per epoch | {total_steps} steps"
    )

    writer = M.MetricsWriter(run_dir, tensorboard=cfg.metrics.tensorboard) if main else None
    throughput = M.Throughput(skip=1 if total_steps > 1 else 0)
    model_fn = par.model
    checkpoint_times: list[float] = []

    def run_eval() -> tuple[float, float]:
        phases.switch("eval")
        tl = evaluate(model_fn, train_eval, cfg.eval.train_subset_batches, policy, device, info)
        vl = evaluate(model_fn, val_eval, cfg.eval.val_batches, policy, device, info)
        return tl, vl

    if resumed is None:
        tl, vl = run_eval()
        train_losses, val_losses = [tl], [vl]
        log(f"epoch 0 | train loss {tl:.4f} | val loss {vl:.4f}")
        step = start_epoch = start_step_in_epoch = 0
        epoch_times: list[float] = []
        skipped_steps = nonfinite_in_a_row = supervised_total = base_real = base_pad = 0
    else:
        train_losses, val_losses = resumed["train_loss_by_epoch"], resumed["val_loss_by_epoch"]
        epoch_times = resumed["epoch_time_s"]
        step, start_epoch, start_step_in_epoch = resumed["step"], resumed["epoch"], resumed["step_in_epoch"]
        skipped_steps, nonfinite_in_a_row = resumed["skipped_steps"], resumed["nonfinite_in_a_row"]
        supervised_total, base_real, base_pad = resumed["supervised_tokens"], resumed["real_tokens"], resumed["pad_tokens"]
    first_step = step  # of this attempt

    def save_checkpoint(next_epoch: int, step_in_epoch: int) -> None:
        phases.switch("checkpoint")
        t0 = time.perf_counter()
        real, pad = all_reduce(info, [throughput.real_tokens_total, throughput.pad_tokens_total])
        state = {
            "step": step, "epoch": next_epoch, "step_in_epoch": step_in_epoch,
            "global_batch_sequences": global_batch, "batching": d.batching, "batch_plan": PLAN_VERSION,
            "seq_len": d.seq_len, "data_manifest_key": prepared.manifest["key"], "seed": cfg.run.seed,
            "world_size": info.world_size, "strategy": cfg.parallel.strategy,
            "model_config": dataclasses.asdict(mc), "config_hash": cfg.hash(), "config": cfg.to_dict(),
            "lora": dataclasses.asdict(cfg.lora) if cfg.lora.enabled else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "train_loss_by_epoch": train_losses, "val_loss_by_epoch": val_losses, "epoch_time_s": epoch_times,
            "supervised_tokens": supervised_total, "skipped_steps": skipped_steps,
            "nonfinite_in_a_row": nonfinite_in_a_row, "real_tokens": base_real + int(real), "pad_tokens": base_pad + int(pad),
        }
        path = ckpt.save(par.model, optimizer, state, step, barrier=lambda: barrier(info))
        checkpoint_times.append(time.perf_counter() - t0)
        log(f"checkpoint {path} ({checkpoint_times[-1]:.2f}s)")

    bar = tqdm(total=total_steps, disable=not (t.progress and main), unit="step", dynamic_ncols=True, file=sys.stderr)
    model_fn.train()
    for epoch in range(start_epoch, t.epochs):
        if step >= total_steps:
            break
        loader.set_epoch(epoch)
        phases.switch("train")
        epoch_train_s = phases.seconds["train"]
        skip = start_step_in_epoch if epoch == start_epoch else 0  # steps a resumed epoch already did
        step_in_epoch = skip
        # every step's supervised-token count over all ranks, from the epoch's plan: the loss
        # normaliser is known before the forward, with no collective and no host sync
        n_global = loader.step_supervised_counts(t.grad_accum)
        prefetch = t.prefetch if device.type == "cuda" else 0  # see the key's note in config.py
        batches = Prefetcher(loader.iter_from(min(skip * t.grad_accum, len(loader))), device, depth=prefetch)
        last = time.perf_counter()
        for group in micro_batch_groups(batches, t.grad_accum):
            if step >= total_steps:
                break
            lr = lr_at(step, total_steps, cfg.optim)
            set_lr(optimizer, lr)
            r = train_step(model_fn, group, optimizer, policy, scaler, cfg.optim.grad_clip, device, par, info,
                           n_global=int(n_global[step_in_epoch]))
            # a step's time runs from the end of the previous step (or of the checkpoint save
            # that followed it), so it includes building the batches and logging; train_step
            # ends with a host sync, so the GPU work is in it too
            now = time.perf_counter()
            dt, last = now - last, now
            step += 1
            step_in_epoch += 1
            work = sum((M.StepWork(b.n_real_tokens, b.n_attention_pairs, b.n_supervised) for b in group), M.StepWork(0, 0, 0))
            throughput.update(r.real_tokens, r.pad_tokens, dt, step_flops(work))
            supervised_total += r.supervised_tokens
            skipped_steps += r.skipped
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if r.skipped else 0
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise TrainingError(
                    f"{nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient (step {step}, "
                    f"last loss {r.loss}); lower optim.lr, or use precision=bf16/fp32 instead of fp16"
                )
            tok_s = r.real_tokens * info.world_size / dt if dt > 0 else 0.0  # estimate; exact figures at the end
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if writer is not None and (step % t.log_every == 0 or step == total_steps):
                writer.log(
                    {
                        "step": step,
                        "epoch": epoch + 1,
                        "loss": M.finite_or_none(r.loss),
                        "lr": lr,
                        "grad_norm": M.finite_or_none(r.grad_norm),
                        "step_time_s": dt,
                        "tokens_per_s": tok_s,
                        "supervised_tokens": r.supervised_tokens,
                        "skipped": r.skipped,
                    }
                )
            every = cfg.checkpoint.every_steps
            if every and step % every == 0 and step_in_epoch < steps_per_epoch and step < total_steps:
                save_checkpoint(epoch, step_in_epoch)
                phases.switch("train")
                last = time.perf_counter()  # the save is not the next step's time
        phases.switch("eval")
        (epoch_time,) = all_reduce(info, [phases.seconds["train"] - epoch_train_s], op="max")
        epoch_times.append(epoch_time)
        tl, vl = run_eval()
        train_losses.append(tl)
        val_losses.append(vl)
        if main:
            bar.write(f"epoch {epoch + 1} | train loss {tl:.4f} | val loss {vl:.4f} | {epoch_time:.1f}s")
        if cfg.checkpoint.every_epoch and step_in_epoch >= steps_per_epoch:
            save_checkpoint(epoch + 1, 0)
    bar.close()
    if writer is not None:
        writer.close()

    phases.switch("final_save")
    ckpt_bytes = adapter_bytes = None
    if cfg.checkpoint.save_final:
        state = full_state_dict(par)  # a collective under FSDP: every rank takes part
        if main:
            if cfg.lora.enabled:  # adapters alone, then merged into plain weights for everything downstream
                adapter_bytes = M.dir_bytes(save_adapter(adapter_state_dict(state, cfg.lora), cfg, run_dir / "adapter"))
                state = merge_state_dict(state, cfg.lora)
            plain = GPT(mc)
            plain.load_state_dict(state)
            ckpt_bytes = M.dir_bytes(save_consolidated(plain, run_dir / "checkpoint", cfg.checkpoint.export_dtype))
    phases.switch(None)

    # every rank's own figures; the job's are sums of tokens and FLOPs, maxima of times and memory
    mine = {
        "rank": info.rank,
        "real_tokens_timed": throughput.tokens,
        "flops_timed": throughput.flops,
        "timed_s": throughput.seconds,
        "tokens_per_s": throughput.tokens_per_s,
        "peak_flops": peak,
        "peak_gpu_mem_bytes": phases.peaks["train"]["gpu_allocated_bytes"],
        "peak_gpu_reserved_bytes": phases.peaks["train"]["gpu_reserved_bytes"],
        "peak_host_rss_bytes": phases.peaks["train"]["host_rss_bytes"],
        "setup_peak_gpu_mem_bytes": phases.peaks["setup"]["gpu_allocated_bytes"],
        "setup_peak_gpu_reserved_bytes": phases.peaks["setup"]["gpu_reserved_bytes"],
        "setup_peak_host_rss_bytes": phases.peaks["setup"]["host_rss_bytes"],
        "peak_memory_by_phase": phases.peaks,
        "time_by_phase_s": phases.seconds,
        "checkpoint_time_s": checkpoint_times,
        "real_tokens": throughput.real_tokens_total,
        "pad_tokens": throughput.pad_tokens_total,
        "grad_comm_bytes": par.comm.bytes,
    }
    per_rank = gather_objects(info, mine)
    if not main:
        return {}

    def job_max(key):
        values = [r[key] for r in per_rank if r[key] is not None]
        return max(values) if values else None

    def phase_max(phase: str) -> float:
        return max(r["time_by_phase_s"][phase] for r in per_rank)

    timed_s = job_max("timed_s") or 0.0
    tps = sum(r["real_tokens_timed"] for r in per_rank) / timed_s if timed_s > 0 else None
    flops_timed = sum(r["flops_timed"] for r in per_rank)
    job_peak = sum(r["peak_flops"] for r in per_rank)
    real_all = base_real + sum(r["real_tokens"] for r in per_rank)
    pad_all = base_pad + sum(r["pad_tokens"] for r in per_rank)
    steps_run = step - first_step  # by this attempt: what its counters cover
    if cfg.parallel.strategy in ("ddp", "zero1"):
        # the hook measures the gradient bytes handed to all-reduce; a ring all-reduce of G
        # bytes makes each rank send 2 (W-1)/W G
        w = info.world_size
        measured = per_rank[0]["grad_comm_bytes"] / steps_run if steps_run else 0.0
        comm_per_step = 2 * (w - 1) / w * measured
        comm_how = f"measured: {measured:.0f} gradient bytes all-reduced per step (DDP comm hook), x 2(W-1)/W for a ring"
        if cfg.parallel.strategy == "zero1":
            # each rank then broadcasts the fp32 parameters it updated to the others
            comm_per_step += (w - 1) / w * n_params * 4
            comm_how += ", plus the ZeRO-1 parameter broadcast (W-1)/W x fp32 parameter bytes (computed)"
    elif sharded:
        comm_per_step = fsdp_comm_bytes_per_step(par, policy, cfg.parallel, info, t.grad_accum)
        comm_how = "computed from sharded sizes"
    else:
        comm_per_step, comm_how = 0, "none (single process)"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    checkpoint_times = per_rank[0]["checkpoint_time_s"]  # the saves end with a barrier: every rank waits as long
    summary = {
        "precision": policy.name,
        "precision_requested": policy.requested,
        "precision_note": policy.note,
        "strategy": cfg.parallel.strategy,
        "world_size": info.world_size,
        "num_nodes": info.num_nodes,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "params": n_params,
        "trainable_params": trainable,
        "tokens_per_s": tps,
        "epoch_time_s": epoch_times,
        "mean_epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
        "peak_gpu_mem_bytes": job_max("peak_gpu_mem_bytes"),
        "peak_gpu_reserved_bytes": job_max("peak_gpu_reserved_bytes"),
        "peak_host_rss_bytes": job_max("peak_host_rss_bytes"),
        "setup_peak_gpu_mem_bytes": job_max("setup_peak_gpu_mem_bytes"),
        "setup_peak_gpu_reserved_bytes": job_max("setup_peak_gpu_reserved_bytes"),
        "setup_peak_host_rss_bytes": job_max("setup_peak_host_rss_bytes"),
        "peak_host_rss_how": "per phase: VmHWM reset at each phase start (/proc/self/clear_refs)"
        if phases.host_peak_resettable else "whole process: the kernel did not allow resetting its peak-RSS mark",
        "checkpoint_bytes": ckpt_bytes,
        "adapter_bytes": adapter_bytes,
        "sharded_checkpoint_bytes": M.dir_bytes(latest) if (latest := ckpt.latest()) else None,
        "train_loss_by_epoch": train_losses,
        "val_loss_by_epoch": val_losses,
        "mfu": flops_timed / (timed_s * job_peak) if (timed_s > 0 and job_peak) else None,
        "mfu_peak_source": peak_source,
        "padding_fraction": pad_all / (real_all + pad_all) if real_all + pad_all else 0.0,
        # where the wall clock went (this attempt; each the slowest rank's)
        "setup_time_s": phase_max("setup"),
        "eval_time_s": phase_max("eval"),
        "train_time_s": phase_max("train"),
        "checkpoint_time_s": checkpoint_times,
        "checkpoint_time_total_s": sum(checkpoint_times),
        "final_save_time_s": phase_max("final_save"),
        # context for reading the numbers above
        "steps": step,
        "epochs_completed": len(epoch_times),
        "last_epoch_partial": step < t.epochs * steps_per_epoch and step == total_steps,
        "timed_steps": max(throughput.steps - throughput.skip, 0),
        "timed_s": timed_s,
        "real_tokens": real_all,
        "supervised_tokens": supervised_total,
        "skipped_steps": skipped_steps,
        "global_batch_sequences": global_batch,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "seq_len": d.seq_len,
        "batching": d.batching,
        "comm_bytes_per_step": comm_per_step,
        "comm_bytes_how": comm_how,
        "flops_timed": flops_timed,
        "flops_per_token": flops_timed / sum(r["real_tokens_timed"] for r in per_rank) if flops_timed else None,
        "peak_flops": job_peak,
        "per_rank": per_rank,
        "data_manifest_key": prepared.manifest["key"],
        "data_counts": prepared.manifest.get("counts"),
        "config_hash": cfg.hash(),
        "environment": environment,
        "resumed_from_step": resumed["step"] if resumed else None,
        "launch": launch_info(),
        "wall_time_s": time.perf_counter() - started,
        "finished_at": M.now_iso(),
    }
    M.write_json_atomic(summary, run_dir / "summary.json")
    log(
        f"done | tokens/s {tps or 0:,.0f} | mean epoch {summary['mean_epoch_time_s'] or 0:.1f}s | "
        f"loss by epoch {[round(x, 4) for x in train_losses]} | {run_dir / 'summary.json'}"
    )
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m distrib_gpt.train ...` is `distrib-gpt train ...`."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


def _exit(code: int) -> None:
    """Leave a torchrun worker without the interpreter's teardown. Every output is written and
    closed and the process group destroyed by now, but gloo worker processes were seen to
    abort in C++ static destructors at exit ("terminate called without an active
    exception"), rarely and only under load, turning a finished job into a failed one."""
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
