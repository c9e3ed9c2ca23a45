"""Planned vs measured memory: `distrib-gpt plan`'s per-GPU terms against real training steps.

Each case runs in a fresh process (two under torchrun for the 2-rank cases, gloo) with our own
code path: GPT (random init), parallelize (DDP / ZeRO-1 / FSDP2), build_optimizer (fused AdamW)
and train.train_step with 2 micro-batches of random token ids, every position supervised
(the planner's --supervised-fraction 1.0). Measured per rank:

- parameter / gradient / AdamW-state bytes: the tensors themselves (the local shards under FSDP);
  DDP's gradient buckets: the sizes of the flat buckets its reducer allocated;
- saved for backward: one training forward under torch.autograd.graph.saved_tensors_hooks,
  summing the distinct storages that are not parameters (nor views of them);
- peak delta: a warm-up step first creates the optimizer state; then one optimizer step of 2
  micro-batches runs, and the delta is its peak above what was live before it. CPU (default):
  the resident set, VmHWM (reset through /proc/self/clear_refs = 5) - VmRSS before, with glibc
  told to mmap every allocation of 64 KiB or more (MALLOC_MMAP_THRESHOLD_) so that freed tensors
  leave the resident set at once and RSS follows live tensor bytes. `--device cuda`:
  torch.cuda.max_memory_allocated - memory_allocated before (not run yet: no GPU lent so far).
  The planned figure is the planner's total minus what is live before the step (parameters,
  AdamW state, DDP buckets).

The planner's figures are for the most-loaded rank; the measured ones are the maximum over ranks.

    python bench/plan_vs_measured.py --out bench/results/plan_vs_measured.json   # 10 cases, ~7 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distrib_gpt import plan as P
from distrib_gpt.config import OptimConfig, ParallelConfig
from distrib_gpt.data.loader import Batch
from distrib_gpt.distributed import init_distributed, shutdown
from distrib_gpt.model import GPT, GPTConfig
from distrib_gpt.optim import build_optimizer
from distrib_gpt.parallel import parallelize
from distrib_gpt.precision import resolve_precision
from distrib_gpt.train import train_step

QUICKSTART = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256}  # configs/quickstart.yaml
GPT2 = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}
# bf16 matmuls are emulated on this development CPU (no AVX-512 BF16: ~1 GFLOP/s), so the bf16
# cases use the small shape and short sequences.
CASES = [
    {"name": "quickstart fp32", "shape": QUICKSTART, "precision": "fp32", "b": 8, "s": 256},
    {"name": "quickstart fp32 AC", "shape": QUICKSTART, "precision": "fp32", "b": 8, "s": 256, "ac": True},
    {"name": "quickstart bf16", "shape": QUICKSTART, "precision": "bf16", "b": 2, "s": 64},
    {"name": "quickstart bf16 AC", "shape": QUICKSTART, "precision": "bf16", "b": 2, "s": 64, "ac": True},
    {"name": "gpt2-124M fp32", "shape": GPT2, "precision": "fp32", "b": 1, "s": 128},
    {"name": "gpt2-124M fp32 AC", "shape": GPT2, "precision": "fp32", "b": 1, "s": 128, "ac": True},
    {"name": "gpt2-124M ddp x2", "shape": GPT2, "precision": "fp32", "b": 1, "s": 128, "strategy": "ddp", "world": 2},
    {"name": "gpt2-124M zero1 x2", "shape": GPT2, "precision": "fp32", "b": 1, "s": 128, "strategy": "zero1", "world": 2},
    {"name": "gpt2-124M fsdp_full x2", "shape": GPT2, "precision": "fp32", "b": 1, "s": 128, "strategy": "fsdp_full",
     "world": 2},
    {"name": "gpt2-124M fsdp_grad_op x2", "shape": GPT2, "precision": "fp32", "b": 1, "s": 128,
     "strategy": "fsdp_grad_op", "world": 2},
]
MICRO_BATCHES = 2


# ----------------------------------------------------------------------------- measuring (child)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _batch(b: int, s: int, vocab: int) -> Batch:
    ids = torch.randint(0, vocab, (b, s + 1))
    # clone: with b = 1 the sliced view is already "contiguous" and would keep the whole row
    return Batch(ids[:, :-1].clone(), ids[:, 1:].clone(), b * s, b * s, 0)


def _saved_for_backward(model: nn.Module, batch: Batch, policy) -> tuple[int, torch.Tensor]:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter):
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), policy.autocast():
        _, loss = model(batch.input_ids, batch.labels, reduction="sum", return_logits=False, **batch.model_inputs())
    return sum(storages.values()), loss


class _PeakMeter:
    """Peak bytes above the start of one step: the CPU's resident set (VmHWM, reset through
    /proc/self/clear_refs), or CUDA's caching allocator (max_memory_allocated)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        return self.base

    def peak_delta(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def measure(case: dict) -> dict:
    """One case on this rank: exact state bytes, saved-for-backward bytes, peak delta of a step."""
    info, device = init_distributed(case.get("device", "cpu"), 600)
    strategy = case.get("strategy", "single")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**case["shape"]))
    if not strategy.startswith(("fsdp", "hsdp")):  # fully_shard moves its shards; DDP and one process do not
        model = model.to(device)
    policy = resolve_precision(case["precision"], device)
    par = parallelize(model, ParallelConfig(strategy=strategy, activation_checkpointing=case.get("ac", False)),
                      policy, info, device)
    reducer = getattr(par.model, "reducer", None)  # DDP's: the flat gradient buckets it allocated
    buckets = _bytes(b.buffer() for b in reducer._get_zeros_like_grad_buckets()) if reducer is not None else 0
    opt = build_optimizer(par.model, OptimConfig(), device, zero1=strategy == "zero1")
    vocab = model.config.vocab_size
    batches = [_batch(case["b"], case["s"], vocab).to(device) for _ in range(MICRO_BATCHES)]

    saved, loss = _saved_for_backward(par.model, batches[0], policy)
    loss.backward()  # warm-up step: gradients, then the optimizer state
    grads = _bytes(p.grad for p in par.model.parameters() if p.grad is not None)
    opt.step()
    opt.zero_grad(set_to_none=True)
    inner = opt.optim if strategy == "zero1" else opt  # ZeroRedundancyOptimizer keeps this rank's in .optim
    state = _bytes(t for s in inner.state.values() for t in s.values() if torch.is_tensor(t))
    del loss
    gc.collect()

    meter = _PeakMeter(device)
    before = meter.start()
    t0 = time.perf_counter()
    train_step(par.model, batches, opt, policy, None, 1.0, device, par, info)
    seconds = time.perf_counter() - t0
    out = {
        "rank": info.rank, "device": str(device), "params": _bytes(par.model.parameters()), "grads": grads,
        "optimizer": state, "saved_for_backward": saved, "ddp_buckets": buckets, "before_step": before,
        "peak_delta": meter.peak_delta(), "step_seconds": seconds,
    }
    shutdown(info)
    return out


# ----------------------------------------------------------------------------- planning, running


def planned(case: dict) -> dict:
    shape = P.Shape.from_config(GPTConfig(**case["shape"]))
    inp = P.PlanInput(shape, case["name"], "a100-80gb", gpus=case.get("world", 1),
                      strategy=case.get("strategy", "single"), precision=case["precision"], micro_batch=case["b"],
                      seq=case["s"], grad_accum=MICRO_BATCHES, activation_checkpointing=case.get("ac", False))
    mem = P.memory(inp)
    act = P.activations(shape, case["b"], case["s"], case["precision"], inp.activation_checkpointing,
                        fsdp=inp.strategy in P.FSDP)
    resident = mem.params + mem.optimizer + mem.ddp_buckets
    return {"params": mem.params, "grads": mem.grads, "optimizer": mem.optimizer, "ddp_buckets": mem.ddp_buckets,
            "saved_for_backward": act.saved, "peak_delta": mem.total - resident, "total": mem.total}


def run_case(case: dict, tmp: Path) -> list[dict]:
    spec = tmp / "case.json"
    spec.write_text(json.dumps(case))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(2 // case.get("world", 1))}
    world = case.get("world", 1)
    if world == 1:
        cmd = [sys.executable, __file__, "--child", str(spec), "--result", str(tmp / "rank0.json")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               __file__, "--child", str(spec), "--result", str(tmp / "rank{rank}.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{case['name']} failed:\n{r.stderr[-3000:]}")
    return [json.loads((tmp / f"rank{k}.json").read_text()) for k in range(world)]


def _row(name: str, term: str, plan_b: float, meas_b: float) -> dict:
    err = (plan_b - meas_b) / meas_b if meas_b else 0.0
    return {"case": name, "term": term, "planned": plan_b, "measured": meas_b, "error": err}


def compare(case: dict, ranks: list[dict]) -> list[dict]:
    p = planned(case)
    worst = {k: max(r[k] for r in ranks) for k in ranks[0] if k != "rank"}
    rows = [_row(case["name"], term, p[term], worst[term])
            for term in ("params", "grads", "optimizer", "saved_for_backward", "peak_delta")]
    if p["ddp_buckets"]:
        rows.insert(3, _row(case["name"], "ddp_buckets", p["ddp_buckets"], worst["ddp_buckets"]))
    return rows


def table(rows: list[dict]) -> str:
    mib = 1 << 20
    lines = ["| case | term | planned MiB | measured MiB | error |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['term']} | {r['planned'] / mib:,.2f} | {r['measured'] / mib:,.2f} | "
                     f"{r['error']:+.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the raw figures here (JSON)")
    ap.add_argument("--only", help="run only the cases whose name contains this")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the peak is torch.cuda.max_memory_allocated (2-rank cases need 2 GPUs)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = measure(json.loads(args.child.read_text()))
        Path(args.result.format(rank=result["rank"])).write_text(json.dumps(result))
        return

    t0 = time.perf_counter()
    rows, raw = [], []
    for case in CASES:
        if args.only and args.only not in case["name"]:
            continue
        case = {**case, "device": args.device}
        if args.device == "cuda" and case.get("world", 1) > torch.cuda.device_count():
            print(f"{case['name']}: skipped ({torch.cuda.device_count()} GPU(s))", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ranks = run_case(case, Path(tmp))
        raw.append({"case": case, "planned": planned(case), "measured": ranks})
        rows += compare(case, ranks)
        print(f"{case['name']}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print(table(rows))
    if args.out:
        env = {"torch": torch.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
               "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1)}
        args.out.write_text(json.dumps({"environment": env, "rows": rows, "raw": raw}, indent=2) + "\n")


if __name__ == "__main__":
    main()
