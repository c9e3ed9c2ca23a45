"""Metrics: where every number in metrics.jsonl and summary.json is computed.

- time: `Phases` splits the run's wall clock into set-up, evaluation, training steps,
  checkpoint saves and the final save, so each figure covers exactly one of them;
- throughput counts real (non-pad) input tokens over timed optimizer steps only (the first
  step, allocator warm-up and lazy initialisation, is not timed);
- FLOPs are the matmul FLOPs a step executes, counted from the model's structure and the
  batch (`training_flops`): positions through the blocks, query-key pairs through attention,
  supervised positions through the LM head, and backward matmuls only where a gradient is
  needed (frozen weights: input gradients only). MFU divides them by the peak of the
  compute dtype: the vendor's figure on known GPUs, a short matmul measurement elsewhere;
- memory is the peak of each phase: the CUDA caching allocator's (allocated and reserved) and
  the process's resident set (the kernel's high-water mark, VmHWM, which unlike sampling
  cannot miss a spike), both reset when a phase starts.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import torch
from torch import nn
from torch.nn import functional as F

# Dense (no sparsity) peak TFLOP/s by GPU and compute dtype, from the vendors' data sheets.
# "fp32" is the CUDA-core rate, "tf32" the tensor-core rate for fp32 matmuls. A GPU missing a
# dtype (the T4 and V100 have no bf16 or TF32) has no entry for it.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "T4": {"fp32": 8.1, "fp16": 65.0},
    "V100": {"fp32": 15.7, "fp16": 125.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},  # SXM
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
    "H200": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
}

# The GPUs `distrib-gpt plan` knows, by planner name: (GPU_PEAK_TFLOPS key, memory in bytes).
# Memory is the vendor's nominal capacity, which NVIDIA counts in GiB ("80GB" = 80 GiB of HBM);
# the driver exposes slightly less (an 80 GB card reports about 79.2 GiB), which the
# planner's fixed reserve covers (distrib_gpt/plan.py).
_GiB = 1 << 30
GPU_SPECS: dict[str, tuple[str, int]] = {
    "t4": ("T4", 16 * _GiB),
    "v100-16gb": ("V100", 16 * _GiB),
    "v100-32gb": ("V100", 32 * _GiB),
    "a100-40gb": ("A100", 40 * _GiB),
    "a100-80gb": ("A100", 80 * _GiB),
    "h100": ("H100", 80 * _GiB),  # SXM
    "h100-pcie": ("H100 PCIe", 80 * _GiB),
    "h200": ("H200", 141 * _GiB),
}


def gpu_key(device_name: str) -> Optional[str]:
    """Map a CUDA device name ("NVIDIA A100-SXM4-40GB") to a GPU_PEAK_TFLOPS key."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return "H100 PCIe"
    for key in ("H200", "H100", "A100", "V100", "T4"):
        if key in name:
            return key
    return None


def spec_peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """The vendor's dense peak FLOP/s of a known GPU for a resolved precision policy, else None."""
    if device.type != "cuda":
        return None
    key = gpu_key(torch.cuda.get_device_name(device))
    if key is None:
        return None
    tflops = GPU_PEAK_TFLOPS[key].get(precision)
    return None if tflops is None else tflops * 1e12


@functools.lru_cache(maxsize=None)  # once per process and (device, dtype): the machine does not change
def measure_matmul_flops(device: torch.device, dtype: torch.dtype, budget_s: float = 0.5) -> float:
    """FLOP/s of the fastest square Linear-layer product this device runs in `dtype`, within about
    `budget_s` seconds: sizes double from 256 (up to 2048 on a CPU, 8192 on a GPU) while one
    product takes under a tenth of the budget (fp16 on a CPU without fp16 units runs 100x
    slower than fp32, so the size must adapt); each size is timed five times after a warm-up
    and the best time kept, so a moment of contention does not lower the figure. A measured
    ceiling, not the hardware's theoretical one: MFU against it reads "share of what this
    machine's matmul kernels reach", which is what a CPU run can be compared with."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen = torch.Generator(device="cpu").manual_seed(0)
    largest = 8192 if device.type == "cuda" else 2048
    best, deadline, n = 0.0, time.perf_counter() + budget_s, 256
    while True:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        # F.linear (x @ W^T), the layout of every Linear layer: some CPU kernels are far
        # slower in other layouts (fp16 a @ b: ~20x slower than F.linear here)
        F.linear(a, b)  # warm-up: kernel selection, packing buffers
        sync()
        fastest = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            F.linear(a, b)
            sync()
            fastest = min(fastest, time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                break
        best = max(best, 2 * n**3 / fastest)
        if n >= largest or fastest > budget_s / 10 or time.perf_counter() > deadline:
            return best
        n *= 2


def peak_flops(device: torch.device, precision: str, compute_dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, source) for MFU: the data-sheet figure of a known GPU ("spec"), else a
    matmul measurement in the compute dtype on this device ("measured")."""
    spec = spec_peak_flops(device, precision)
    if spec is not None:
        return spec, "spec"
    return measure_matmul_flops(device, compute_dtype), "measured"


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> int:
    """The planning estimate of training FLOPs per token: 6N for the matmuls of forward +
    backward, plus attention's QK^T and AV (12·L·H·Q·T), as in the PaLM paper's appendix B and
    nanoGPT's estimate_mfu. N excludes the position embedding (a lookup, not a matmul). It
    charges the LM head at every position; `training_flops` counts what a step executes."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


@dataclass(frozen=True)
class StepWork:
    """What a batch (or a step's micro-batches) puts through the model."""

    positions: int
    """Input positions that go through the transformer blocks (real tokens; pads excluded)."""
    attention_pairs: int
    """Query-key pairs attention needs: the sum over the sequences that attend to themselves
    of (length)^2, where a sequence is a row (pad, pack_concat) or one example of a packed
    row (pack: document-masked, so pairs across examples are not model work, whatever the
    kernel executes; the dense-mask kernel computes the row's full square). Causal attention
    needs only the lower half, but the kernels (and FlopCounterMode) compute the full square,
    so it is counted the usual way (PaLM, nanoGPT)."""
    supervised: int
    """Positions with a target: the only ones the LM head runs at (`GPT.forward`)."""

    def __add__(self, other: "StepWork") -> "StepWork":
        return StepWork(self.positions + other.positions, self.attention_pairs + other.attention_pairs,
                        self.supervised + other.supervised)


def _linear_flops(layer: nn.Linear, n: int, input_grad: bool) -> tuple[int, int, bool]:
    """(forward, backward, output needs a gradient) matmul FLOPs of `layer` over n positions.
    Backward computes the input's gradient only where something upstream needs it, and the
    weight's only where the weight is trained; a LoRA layer adds its two thin matmuls."""
    i, o = layer.in_features, layer.out_features
    fwd, bwd = 2 * n * i * o, 0
    bwd += 2 * n * i * o if layer.weight.requires_grad else 0
    bwd += 2 * n * i * o if input_grad else 0
    out_grad = input_grad or layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad)
    lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if lora_a is not None and lora_b is not None:
        r = lora_a.shape[0]
        fwd += 2 * n * i * r + 2 * n * r * o
        bwd += 2 * n * r * o if lora_b.requires_grad else 0  # dB = dy^T (x A^T)
        bwd += 2 * n * r * o if (lora_a.requires_grad or input_grad) else 0  # d(x A^T) = dy B
        bwd += 2 * n * i * r if lora_a.requires_grad else 0  # dA = d(x A^T)^T x
        bwd += 2 * n * i * r if input_grad else 0  # dx through A
        out_grad = out_grad or lora_a.requires_grad or lora_b.requires_grad
    return fwd, bwd, out_grad


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def training_flops(model: nn.Module, work: StepWork) -> tuple[int, int]:
    """(forward, backward) matmul FLOPs of one training pass of `model` (a distrib_gpt GPT,
    wrapped or not: only its structure and which parameters train are read) over `work`.

    Counted: every Linear (2 FLOPs per multiply-add), attention's QK^T and AV (4 · C FLOPs per
    query-key pair per layer), the LM head at supervised positions. Backward: 2x the forward
    for a trained layer whose input needs a gradient; the weight-gradient half only, or the
    input-gradient half only, where one of them is not needed (frozen weights under LoRA;
    the first layers when nothing before them trains); attention's backward is 2x its forward
    where its inputs need gradients. Not counted: element-wise work (LayerNorm, GELU, softmax,
    bias adds) and activation checkpointing's recomputed forward (model FLOPs, not hardware
    FLOPs, as in the PaLM paper's MFU). tests/test_metrics.py checks the count against
    torch.utils.flop_counter.FlopCounterMode on real steps."""
    n, tr = work.positions, model.transformer
    grad = _trains(tr.wte) or _trains(tr.wpe)  # does the residual stream need a gradient yet?
    fwd = bwd = 0
    for block in tr.h:
        x_grad = grad or _trains(block.ln_1)
        f, b, qkv_grad = _linear_flops(block.attn.c_attn, n, x_grad)
        fwd, bwd = fwd + f, bwd + b
        attn = 4 * block.attn.n_embd * work.attention_pairs
        fwd += attn
        bwd += 2 * attn if qkv_grad else 0
        f, b, attn_out_grad = _linear_flops(block.attn.c_proj, n, qkv_grad)
        fwd, bwd = fwd + f, bwd + b
        grad = grad or attn_out_grad
        f, b, h_grad = _linear_flops(block.mlp.c_fc, n, grad or _trains(block.ln_2))
        fwd, bwd = fwd + f, bwd + b
        f, b, mlp_out_grad = _linear_flops(block.mlp.c_proj, n, h_grad)
        fwd, bwd = fwd + f, bwd + b
        grad = grad or mlp_out_grad
    head = model.lm_head
    f, b, _ = _linear_flops(head, work.supervised, grad or _trains(tr.ln_f))
    return fwd + f, bwd + b


def training_flops_fn(model: nn.Module) -> Callable[[StepWork], int]:
    """`work -> forward + backward FLOPs` for `model`, with the structure walked once: the
    count is linear in each of positions, attention pairs and supervised positions."""
    a, b, c = (sum(training_flops(model, StepWork(*unit))) for unit in ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    return lambda w: a * w.positions + b * w.attention_pairs + c * w.supervised


def reset_peak_host_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process, so the next reading covers
    only what follows; False where the kernel does not allow it (not Linux, old kernels)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_host_rss_bytes() -> int:
    """The process's peak resident set size since start or the last `reset_peak_host_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss (never reset) is in KiB on Linux and in bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def host_rss_bytes() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def gpu_memory(device: torch.device) -> tuple[Optional[int], Optional[int]]:
    """(peak allocated, peak reserved) bytes on a CUDA device since the last reset; (None,
    None) elsewhere."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


PHASES = ("setup", "eval", "train", "checkpoint", "final_save")


class Phases:
    """Wall seconds and memory peaks of a run's phases: "setup" (process group, data, model,
    optimizer, resume: until the first evaluation), "eval", "train" (optimizer steps,
    batch building and logging included), "checkpoint" (periodic sharded saves, the barriers
    around them included) and "final_save" (the consolidated checkpoint).

    `switch(name)` closes the current phase: its seconds are added to its total, and the
    memory peaks since the previous switch are maxed into its peaks; the peaks are then reset,
    so each phase's peak is its own (the set-up peak, which includes building the whole model
    and loading weights, no longer hides inside the training peak)."""

    def __init__(self, device: torch.device, started: float, phase: str = "setup"):
        self.device = device
        self.seconds = {p: 0.0 for p in PHASES}
        self.peaks: dict[str, dict[str, Optional[int]]] = {
            p: {"gpu_allocated_bytes": None, "gpu_reserved_bytes": None, "host_rss_bytes": None} for p in PHASES
        }
        self.host_peak_resettable = True  # until a reset fails
        self.current, self._since = phase, started

    def switch(self, phase: Optional[str]) -> None:
        now = time.perf_counter()
        self.seconds[self.current] += now - self._since
        allocated, reserved = gpu_memory(self.device)
        peaks = self.peaks[self.current]
        for key, value in (("gpu_allocated_bytes", allocated), ("gpu_reserved_bytes", reserved),
                           ("host_rss_bytes", peak_host_rss_bytes())):
            if value is not None:
                peaks[key] = max(value, peaks[key] or 0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.host_peak_resettable = reset_peak_host_rss() and self.host_peak_resettable
        if phase is not None:
            self.current = phase
        self._since = time.perf_counter()


def dir_bytes(path: Path) -> int:
    """Apparent size of `path` and everything under it: the bytes of every file plus the
    directories' own entries, what `du -s --apparent-size -B1` reports (tests compare them)."""
    path = Path(path)
    return path.lstat().st_size + sum(p.lstat().st_size for p in path.rglob("*"))


@dataclass
class Throughput:
    """Real tokens, executed FLOPs and seconds of timed optimizer steps on this rank (the
    first `skip` steps are not timed)."""

    skip: int = 1
    steps: int = 0
    tokens: int = 0
    flops: int = 0
    seconds: float = 0.0
    real_tokens_total: int = 0
    pad_tokens_total: int = 0

    def update(self, real_tokens: int, pad_tokens: int, seconds: float, flops: int = 0) -> None:
        self.steps += 1
        self.real_tokens_total += real_tokens
        self.pad_tokens_total += pad_tokens
        if self.steps > self.skip:
            self.tokens += real_tokens
            self.flops += flops
            self.seconds += seconds

    @property
    def tokens_per_s(self) -> Optional[float]:
        if self.seconds > 0:
            return self.tokens / self.seconds
        return None



class MetricsWriter:
    """Appends one JSON line per logged step to metrics.jsonl (and TensorBoard if enabled)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise RuntimeError(
                    "metrics.tensorboard: the tensorboard package is not installed "
                    "(pip install 'distrib-gpt[tensorboard]')"
                ) from e
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def environment() -> dict[str, Any]:
    import numpy
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
    }


def finite_or_none(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
