"""AdamW with GPT-2's decay rule, and the learning-rate schedule.

Weight decay applies to 2-D weights (matmul weights and embeddings) only; biases and
LayerNorm gains are not decayed, as in GPT-2/3 and nanoGPT. The schedule is a linear
warmup to `lr` followed by a cosine decay to `lr * min_lr_ratio`; it is a pure function of
the step so a resumed run needs only the step counter.
"""

from __future__ import annotations

import inspect
import math

import torch

from .config import ConfigError, OptimConfig


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device: torch.device, zero1: bool = False, allow_fused: bool = True
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel does the whole update in one launch per dtype/device (CUDA and, since
    # torch 2.4, CPU); older builds lack it, so "auto" falls back to the foreach path.
    supported = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu")
    if cfg.fused == "on" and not (supported and allow_fused):
        raise ConfigError(f"optim.fused: the fused AdamW kernel is not available here ({device.type}, or fp16 under FSDP)")
    fused = supported and allow_fused and cfg.fused != "off"
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if zero1:
        # ZeRO stage 1: each rank keeps the AdamW states of its share of the parameters,
        # steps only those, then broadcasts the updated parameters to the other ranks
        from torch.distributed.optim import ZeroRedundancyOptimizer

        zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW, weight_decay=cfg.weight_decay, **kwargs)
        zero.add_param_group({"params": groups[1]["params"], "weight_decay": 0.0})
        return zero
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    min_lr = cfg.lr * cfg.min_lr_ratio
    span = max(total_steps - 1 - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
