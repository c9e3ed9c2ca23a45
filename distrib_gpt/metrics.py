"""Metrics: where every number in metrics.jsonl and summary.json is computed.

- throughput counts real (non-pad) input tokens over timed optimizer steps only; evaluation,
  checkpointing and the first step (allocator warm-up, lazy initialisation) are excluded;
- MFU uses the PaLM/nanoGPT estimate of training FLOPs per token, 6N + 12·L·H·Q·T, against
  the device's dense peak for the run's compute dtype (None when the device is unknown);
- memory is the CUDA caching allocator's peak (allocated and reserved) and the process's
  peak resident set size (getrusage, which, unlike sampling, cannot miss a spike).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import psutil
import torch

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


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Peak FLOP/s of `device` for a resolved precision policy, or None if unknown (CPUs)."""
    if device.type != "cuda":
        return None
    key = gpu_key(torch.cuda.get_device_name(device))
    if key is None:
        return None
    tflops = GPU_PEAK_TFLOPS[key].get(precision)
    return None if tflops is None else tflops * 1e12


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the matmuls of forward + backward, plus attention's
    QK^T and AV (12·L·H·Q·T), as in the PaLM paper's appendix B and nanoGPT's estimate_mfu.
    N excludes the position embedding (it is a lookup, not a matmul)."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def peak_host_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux and in bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def host_rss_bytes() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def gpu_memory(device: torch.device) -> tuple[Optional[int], Optional[int]]:
    """(peak allocated, peak reserved) bytes on a CUDA device; (None, None) elsewhere."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def dir_bytes(path: Path) -> int:
    """On-disk size of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@dataclass
class Throughput:
    """Real tokens and seconds of timed optimizer steps (the first `skip` steps are not timed)."""

    skip: int = 1
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    real_tokens_total: int = 0
    pad_tokens_total: int = 0

    def update(self, real_tokens: int, pad_tokens: int, seconds: float) -> None:
        self.steps += 1
        self.real_tokens_total += real_tokens
        self.pad_tokens_total += pad_tokens
        if self.steps > self.skip:
            self.tokens += real_tokens
            self.seconds += seconds

    @property
    def tokens_per_s(self) -> Optional[float]:
        if self.seconds > 0:
            return self.tokens / self.seconds
        return None

    @property
    def padding_fraction(self) -> float:
        total = self.real_tokens_total + self.pad_tokens_total
        return self.pad_tokens_total / total if total else 0.0


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
