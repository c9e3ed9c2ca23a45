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

import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from . import metrics as M
from .checkpoint import save_consolidated
from .config import Config, ConfigError, save_config
from .data import BatchLoader, TokenizedSplit, prepare_data
from .data.loader import Batch
from .model import GPT, GPTConfig
from .optim import build_optimizer, lr_at, set_lr
from .precision import PrecisionPolicy, resolve_precision


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite losses)."""


# ----------------------------------------------------------------------------- setup


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda was requested but no CUDA device is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build_model(cfg: Config) -> GPT:
    m = cfg.model
    if m.init == "pretrained":
        model = GPT.from_pretrained(m.pretrained_path or m.name, dropout=m.dropout, pad_vocab_to=m.pad_vocab_to)
        if model.config.block_size < cfg.data.seq_len:
            raise ConfigError(
                f"data.seq_len: {cfg.data.seq_len} exceeds the pretrained model's {model.config.block_size} positions"
            )
        return model
    shape = {k: getattr(m, k) for k in ("n_layer", "n_head", "n_embd") if getattr(m, k) is not None}
    common = dict(block_size=m.block_size, dropout=m.dropout, pad_vocab_to=m.pad_vocab_to)
    if m.name == "custom":
        return GPT(GPTConfig(**shape, **common))
    return GPT(GPTConfig.from_name(m.name, **shape, **common))


def check_run_dir(cfg: Config) -> None:
    """Refuse, before any work, to write into a directory that holds another run."""
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.overwrite:
        raise ConfigError(
            f"run.name: run directory {run_dir} already exists and is not empty; "
            "choose another run.name or pass run.overwrite=true"
        )


def create_run_dir(cfg: Config) -> Path:
    run_dir = cfg.run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)  # check_run_dir allowed it: empty, or run.overwrite
    run_dir.mkdir(parents=True)
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
) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation)."""
    n_supervised = sum(b.n_supervised for b in micro_batches)
    denom = max(n_supervised, 1)
    loss_sum = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = batch.to(device, non_blocking=True)
        with policy.autocast():
            _, loss = model(batch.input_ids, batch.labels, reduction="sum", return_logits=False)
        # dividing by the step's token count makes the accumulated gradient that of the
        # mean token loss over the whole step, whatever the micro-batch split.
        loss = loss / denom
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()

    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    loss_value, norm_value = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()  # one sync

    skipped = False
    if not math.isfinite(loss_value):
        skipped = True  # never let a non-finite loss move the weights
        if scaler is not None:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    elif scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skips the update itself if any gradient is inf/nan
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        if math.isfinite(norm_value):
            optimizer.step()
        else:
            skipped = True
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=loss_value,
        grad_norm=norm_value,
        real_tokens=sum(b.n_real_tokens for b in micro_batches),
        pad_tokens=sum(b.n_pad for b in micro_batches),
        supervised_tokens=n_supervised,
        skipped=skipped,
    )


@torch.no_grad()
def evaluate(model: GPT, loader: BatchLoader, max_batches: Optional[int], policy: PrecisionPolicy, device: torch.device) -> float:
    """Mean token loss over the supervised tokens of the first `max_batches` batches."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device, non_blocking=True)
        with policy.autocast():
            _, loss = model(batch.input_ids, batch.labels, reduction="sum", return_logits=False)
        total += loss.double()
        count += batch.n_supervised
    model.train(was_training)
    return total.item() / max(count, 1)


def micro_batch_groups(loader: BatchLoader, grad_accum: int) -> Iterator[list[Batch]]:
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


def train(cfg: Config) -> dict:
    """Run a whole training job; returns the summary that is also written to summary.json."""
    started = time.time()
    device = pick_device(cfg.run.device)
    policy = resolve_precision(cfg.precision, device)
    policy.apply_backend_flags()
    check_run_dir(cfg)
    log = print

    prepared = prepare_data(cfg.data, log=log)
    train_split = TokenizedSplit.open(prepared.dir, "train")
    val_split = TokenizedSplit.open(prepared.dir, "val")
    d, t = cfg.data, cfg.train
    loader = BatchLoader(train_split, d.batching, d.seq_len, t.micro_batch_size, seed=cfg.run.seed)
    eval_bs = cfg.eval.batch_size or t.micro_batch_size
    train_eval = BatchLoader(train_split, d.batching, d.seq_len, eval_bs, seed=cfg.run.seed, shuffle=False)
    val_eval = BatchLoader(val_split, d.batching, d.seq_len, eval_bs, seed=cfg.run.seed, shuffle=False)

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    scaler = policy.make_grad_scaler()
    # everything that can fail on bad input (config, data, model, precision) has been
    # checked by now, so a failed start leaves no run directory behind
    run_dir = create_run_dir(cfg)

    steps_per_epoch = math.ceil(len(loader) / t.grad_accum)
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    mc = model.config
    n_params = model.num_params()
    fpt = M.flops_per_token(model.num_params(exclude_embeddings=True), mc.n_layer, mc.n_head, mc.n_embd // mc.n_head, d.seq_len)
    peak = M.peak_flops(device, policy.name)
    log(
        f"run {run_dir} | {device.type} | precision {policy.name} | params {n_params / 1e6:.1f}M | "
        f"{len(loader)} micro-batches x {t.micro_batch_size} x {d.seq_len} per epoch | {total_steps} steps"
    )

    writer = M.MetricsWriter(run_dir, tensorboard=cfg.metrics.tensorboard)
    throughput = M.Throughput(skip=1 if total_steps > 1 else 0)
    train_losses = [evaluate(model, train_eval, cfg.eval.train_subset_batches, policy, device)]
    val_losses = [evaluate(model, val_eval, cfg.eval.val_batches, policy, device)]
    log(f"epoch 0 | train loss {train_losses[0]:.4f} | val loss {val_losses[0]:.4f}")

    step = 0
    epoch_times: list[float] = []
    skipped_steps = nonfinite_in_a_row = 0
    supervised_total = 0
    bar = tqdm(total=total_steps, disable=not t.progress, unit="step", dynamic_ncols=True, file=sys.stderr)
    model.train()
    for epoch in range(t.epochs):
        if step >= total_steps:
            break
        loader.set_epoch(epoch)
        epoch_start = last = time.perf_counter()
        for group in micro_batch_groups(loader, t.grad_accum):
            if step >= total_steps:
                break
            lr = lr_at(step, total_steps, cfg.optim)
            set_lr(optimizer, lr)
            r = train_step(model, group, optimizer, policy, scaler, cfg.optim.grad_clip, device)
            # a step's time runs from the end of the previous step, so it includes building
            # the batches; train_step ends with a host sync, so the GPU work is in it too
            now = time.perf_counter()
            dt, last = now - last, now
            step += 1
            throughput.update(r.real_tokens, r.pad_tokens, dt)
            supervised_total += r.supervised_tokens
            skipped_steps += r.skipped
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if r.skipped else 0
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise TrainingError(
                    f"{nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient (step {step}, "
                    f"last loss {r.loss}); lower optim.lr, or use precision=bf16/fp32 instead of fp16"
                )
            tok_s = r.real_tokens / dt if dt > 0 else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if step % t.log_every == 0 or step == total_steps:
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
        epoch_times.append(time.perf_counter() - epoch_start)
        train_losses.append(evaluate(model, train_eval, cfg.eval.train_subset_batches, policy, device))
        val_losses.append(evaluate(model, val_eval, cfg.eval.val_batches, policy, device))
        bar.write(
            f"epoch {epoch + 1} | train loss {train_losses[-1]:.4f} | val loss {val_losses[-1]:.4f} | "
            f"{epoch_times[-1]:.1f}s"
        )
    bar.close()
    writer.close()

    ckpt_bytes = None
    if cfg.checkpoint.save_final:
        ckpt_dir = save_consolidated(model, run_dir / "checkpoint", cfg.checkpoint.export_dtype)
        ckpt_bytes = M.dir_bytes(ckpt_dir)

    gpu_peak, gpu_reserved = M.gpu_memory(device)
    tps = throughput.tokens_per_s
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "precision": policy.name,
        "precision_requested": policy.requested,
        "precision_note": policy.note,
        "strategy": cfg.parallel.strategy,
        "world_size": 1,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "params": n_params,
        "trainable_params": trainable,
        "tokens_per_s": tps,
        "epoch_time_s": epoch_times,
        "mean_epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
        "peak_gpu_mem_bytes": gpu_peak,
        "peak_gpu_reserved_bytes": gpu_reserved,
        "peak_host_rss_bytes": M.peak_host_rss_bytes(),
        "checkpoint_bytes": ckpt_bytes,
        "train_loss_by_epoch": train_losses,
        "val_loss_by_epoch": val_losses,
        "mfu": (tps * fpt / peak) if (tps and peak) else None,
        "padding_fraction": throughput.padding_fraction,
        # context for reading the numbers above
        "steps": step,
        "epochs_completed": len(epoch_times),
        "last_epoch_partial": step < t.epochs * steps_per_epoch and step == total_steps,
        "timed_steps": max(throughput.steps - throughput.skip, 0),
        "real_tokens": throughput.real_tokens_total,
        "supervised_tokens": supervised_total,
        "skipped_steps": skipped_steps,
        "global_batch_sequences": t.micro_batch_size * t.grad_accum,
        "seq_len": d.seq_len,
        "batching": d.batching,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "data_manifest_key": prepared.manifest["key"],
        "data_counts": prepared.manifest.get("counts"),
        "config_hash": cfg.hash(),
        "environment": M.environment(),
        "wall_time_s": time.time() - started,
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


if __name__ == "__main__":
    sys.exit(main())
