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

from .config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
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
    if cfg.fused == "on" and not supported:
        raise ValueError(f"optim.fused: the fused AdamW kernel is not available on {device.type}")
    fused = supported and cfg.fused != "off"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


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
