"""LoRA: low-rank adapters on chosen Linear layers (Hu et al. 2021, arXiv:2106.09685).

An adapted layer computes  y = x W^T + b + (alpha / r) · dropout(x) A^T B^T  with the base W, b
frozen, A (r x in) initialised like nn.Linear's weight and B (out x r) at zero, so training
starts exactly at the base model. Only A and B (and, with lora.train_bias, the adapted
layers' biases) require gradients; every other parameter of the model is frozen, so the
optimizer holds state for the adapters alone.

Why our own module instead of `peft`: `LoRALinear` *is* an `nn.Linear` with two extra
parameters, so the base weights keep their names (`...attn.c_attn.weight`). State dicts,
sharded checkpoints, HF export and the FSDP2 wrapping in parallel.py (`fully_shard` per
block: the adapters are sharded with their block, frozen and trainable parameters side by
side, which FSDP2 supports) all work unchanged. peft wraps each layer in a `LoraLayer` with
`base_layer.` renamed keys and its own save format; that is more machinery than these
fifty lines, and it would change every key our checkpoints, resharding and export rely on.

Merging (`merge_state_dict`) folds W + (alpha/r)·B·A into plain Linear weights, on a full
(consolidated) state dict, whatever strategy trained it: the final checkpoint, HF export and
int8 quantization therefore see an ordinary GPT and need nothing LoRA-specific.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from .config import LoRAConfig

ADAPTER_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """nn.Linear (frozen) plus a trainable low-rank update (alpha / rank) · B · A."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, dropout: float,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own weight init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float) -> LoRALinear:
        """A LoRALinear that shares `linear`'s weight and bias Parameters (no copy)."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha, dropout,
                  device=w.device, dtype=w.dtype)
        new.weight = w
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze `model` and put adapters on the `cfg.targets` Linear layers of every block
    (in place). Returns the names of the adapted layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for block_name, block in model.transformer.h.named_children():
        for target in cfg.targets:  # "attn.c_attn" -> block.attn.c_attn
            parent_name, attr = target.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, attr)
            if not isinstance(linear, nn.Linear) or isinstance(linear, LoRALinear):
                raise TypeError(f"lora.targets: h.{block_name}.{target} is not a plain nn.Linear")
            lora = LoRALinear.wrap(linear, cfg.rank, cfg.alpha, cfg.dropout)
            if cfg.train_bias and lora.bias is not None:
                lora.bias.requires_grad_(True)
            setattr(parent, attr, lora)
            adapted.append(f"transformer.h.{block_name}.{target}")
    return adapted


def is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ADAPTER_KEYS


def merge_state_dict(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """A full state dict of a LoRA model -> the plain model's: each adapted weight becomes
    W + (alpha / rank) · B · A (computed in fp32, stored in W's dtype); adapter keys dropped."""
    scaling = cfg.alpha / cfg.rank
    merged = {k: v for k, v in state.items() if not is_adapter_key(k)}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len("lora_A")]
            w = state[prefix + "weight"]
            delta = state[prefix + "lora_B"].float() @ state[key].float()
            merged[prefix + "weight"] = (w.float() + scaling * delta).to(w.dtype)
    return merged


def adapter_state_dict(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """The adapters (and trained biases) of a full LoRA state dict: what `adapter/` holds."""
    out = {k: v for k, v in state.items() if is_adapter_key(k)}
    if cfg.train_bias:
        layers = {k[: -len(".lora_A")] for k in out if k.endswith(".lora_A")}
        out.update({k: v for k, v in state.items() if k.endswith(".bias") and k[: -len(".bias")] in layers})
    return out


def merge_into(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` (a plain, unwrapped model) by an nn.Linear holding
    the merged weight, in place; returns the model."""
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    delta = child.lora_B.float() @ child.lora_A.float()
                    linear.weight.copy_((child.weight.float() + child.scaling * delta).to(child.weight.dtype))
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, attr, linear)
    return model


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), shared Parameters counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
