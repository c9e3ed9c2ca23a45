"""Precision policies: the one place where a run's numeric precision is decided.

A policy says three things: the dtype that matmuls run in under autocast (or none), whether
TF32 tensor cores may be used for fp32 matmuls, and whether a gradient scaler guards fp16
gradients against underflow. Master weights and optimizer states stay fp32 in every policy;
only the compute of the forward and backward passes changes.

    fp32  plain fp32; TF32 explicitly off (the PyTorch default is also off for matmuls,
          but cuDNN convolutions default to on, so we set both).
    tf32  fp32 storage, TF32 tensor cores for matmuls and cuDNN (Ampere and newer).
    fp16  autocast to float16 + dynamic loss scaling (GradScaler); fp32 master weights.
    bf16  autocast to bfloat16; no scaler is needed (bf16 has fp32's exponent range).
    auto  bf16 where the device supports it, else fp16.

CPU runs: fp16 and bf16 use CPU autocast (and `GradScaler("cpu")` for fp16) so CI exercises
the same code paths; tf32 has no meaning on a CPU and computes in plain fp32 (the summary
says so in `precision_note`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


class PrecisionError(ValueError):
    """The requested policy cannot run on this device."""


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    """The resolved policy: fp32, tf32, fp16 or bf16 (never auto)."""
    requested: str
    """What the config asked for (may be auto)."""
    device_type: str
    """'cuda' or 'cpu'."""
    autocast_dtype: Optional[torch.dtype]
    """dtype of autocast regions, or None for no autocast."""
    tf32: bool
    """TF32 tensor cores allowed for fp32 matmuls and convolutions."""
    grad_scaling: bool
    """A GradScaler multiplies the loss before backward (fp16 only)."""
    note: Optional[str] = None
    """A caveat worth reporting, e.g. tf32 on a CPU."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward pass (and loss) runs under."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def make_grad_scaler(self, sharded: bool = False) -> Optional[torch.amp.GradScaler]:
        """fp16's loss scaler. With sharded gradients (FSDP) each rank sees only its shard,
        so whether any gradient overflowed must be agreed across ranks before stepping:
        ShardedGradScaler all-reduces its inf check, so every rank skips or steps together."""
        if not self.grad_scaling:
            return None
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(device=self.device_type)
        return torch.amp.GradScaler(self.device_type)

    def fsdp_mixed_precision(self, reduce_dtype: str = "fp32", matmul_only: bool = True):
        """The policy of one FSDP2 unit, chosen so that FSDP computes what DDP computes.

        Under DDP, autocast casts the inputs of matmuls (Linear weights and biases) to the
        compute dtype and nothing else: the embeddings, the LayerNorms and the residual
        stream stay fp32. So a unit whose parameters only feed matmuls (`matmul_only`: a
        block's attention and MLP) is all-gathered in the compute dtype, the rounding
        autocast would do anyway, at half the bytes; any other unit (the root: embeddings,
        ln_f and the tied LM head, whose matmul autocast casts as under DDP; the blocks'
        LayerNorms) keeps fp32 parameters. cast_forward_inputs=False: FSDP would otherwise
        cast every unit's input, the residual stream, to the compute dtype. Gradients are
        reduced in fp32 by default (`parallel.reduce_dtype`).

        The gradients of a gathered half weight are what DDP gets too: there the matmul's
        half gradient passes autocast's cast back to fp32, here FSDP upcasts it before the
        reduce-scatter. What still differs is outside this policy: the gradient norm for
        clipping is summed shard by shard, fp16 under FSDP uses the unfused AdamW, and with
        more than two ranks the reduce-scatter may add the ranks in another order than DDP's
        all-reduce. With clipping off and the same AdamW, the losses of DDP and FSDP are
        equal to the last bit (tests/test_fsdp_precision.py). (Gathering the blocks' LayerNorms
        in the half dtype as well would round their gains, and on the CPU would not run at all:
        CPU autocast does not upcast layer_norm, which refuses half weights next to an fp32
        input.)"""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        reduce = torch.float32 if reduce_dtype == "fp32" else self.compute_dtype
        param = self.autocast_dtype if matmul_only else None
        return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce, cast_forward_inputs=False)

    def apply_backend_flags(self) -> None:
        """Set process-wide TF32 switches to match the policy (CUDA only)."""
        if self.device_type != "cuda":
            return
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or torch.float32


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def resolve_precision(requested: str, device: torch.device) -> PrecisionPolicy:
    """Turn the config's `precision` into a policy this device can run, or fail clearly."""
    dev = device.type
    if dev not in ("cuda", "cpu"):
        raise PrecisionError(f"precision: unsupported device type {dev!r}")
    name = requested
    if dev == "cuda":
        major, minor = _cuda_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        ampere = major >= 8
        if requested == "auto":
            name = "bf16" if ampere and torch.cuda.is_bf16_supported() else "fp16"
        elif requested in ("bf16", "tf32") and not ampere:
            raise PrecisionError(
                f"precision: {requested} needs compute capability >= 8.0 but {gpu} lacks it; "
                "use precision=fp16 (or precision=auto)"
            )
    elif requested == "auto":
        name = "bf16"  # CPU autocast supports bf16 everywhere; fp16 on CPU is slower

    note = None
    if dev == "cpu" and name == "tf32":
        note = "tf32 has no effect on CPU: computed in fp32"
    table = {
        "fp32": (None, False, False),
        "tf32": (None, dev == "cuda", False),
        "fp16": (torch.float16, False, True),
        "bf16": (torch.bfloat16, False, False),
    }
    if name not in table:
        raise PrecisionError(f"precision: unknown policy {requested!r}; use one of fp32, tf32, fp16, bf16, auto")
    autocast_dtype, tf32, scaling = table[name]
    return PrecisionPolicy(
        name=name,
        requested=requested,
        device_type=dev,
        autocast_dtype=autocast_dtype,
        tf32=tf32,
        grad_scaling=scaling,
        note=note,
    )
