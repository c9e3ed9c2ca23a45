"""Process group: who am I, which device is mine, and the few collectives the recipe uses.

Under `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT) the process group is initialised from the environment: NCCL with one GPU per
local rank when GPUs are visible, gloo on the CPU. Without torchrun the run is a single
process on one GPU if present, else the CPU, and every collective below is a no-op.

Every collective has a timeout (`parallel.timeout_s`): a rank that dies or hangs makes the
others fail after that long instead of waiting for ever, and torchrun then stops the job
and reports the first failing rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # None: no process group (a plain single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def num_nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# What the launcher says about this job, recorded in summary.json so a run can be traced
# back to its SLURM job (and its restarts) or torchrun attempt.
_LAUNCH_ENV = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_restart_count": "SLURM_RESTART_COUNT",
    "slurm_job_nodelist": "SLURM_JOB_NODELIST",
    "torchelastic_run_id": "TORCHELASTIC_RUN_ID",
    "torchelastic_restart_count": "TORCHELASTIC_RESTART_COUNT",
}


def launch_info() -> dict[str, str]:
    """The launcher's job identifiers present in the environment (empty for a plain process)."""
    return {key: os.environ[var] for key, var in _LAUNCH_ENV.items() if os.environ.get(var)}


def init_distributed(device_pref: str, timeout_s: int) -> tuple[DistInfo, torch.device]:
    """Initialise the process group if torchrun started us; return (who am I, my device)."""
    if not launched_by_torchrun():
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise ConfigError("run.device: cuda was requested but no CUDA device is visible")
        use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        return DistInfo(), torch.device("cuda" if use_cuda else "cpu")

    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda was requested but no CUDA device is visible")
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"run.device: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if use_cuda:
            kwargs["device_id"] = device  # binds NCCL eagerly to our GPU
        restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
        if restart > 0:
            # after an elastic restart torchrun's store still holds the dead attempt's
            # connection keys (gloo peer addresses), and a fast rank can read a stale one and
            # fail to connect; a prefix per attempt keeps the attempts apart
            kwargs.update(store=_attempt_store(restart, rank, timeout_s), rank=rank, world_size=world)
        dist.init_process_group(**kwargs)
    return DistInfo(rank, world, local_rank, local_world, backend), device


def _attempt_store(restart: int, rank: int, timeout_s: int) -> dist.Store:
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"distrib_gpt/attempt_{restart}/", store)


def shutdown(info: DistInfo) -> None:
    """Tear the group down together: a rank that destroyed its group while another still
    worked (rank 0 writing the summary) was seen to abort at exit under gloo."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _comm_device(info: DistInfo) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")


def all_reduce(info: DistInfo, values: Sequence[float], op: str = "sum") -> list[float]:
    """All-reduce a few numbers (float64) across ranks: op is sum or max."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def all_reduce_tensor(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks (in place on a copy); the identity without a process group."""
    if not info.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_error(info: DistInfo, message: str | None) -> str | None:
    """Share the first rank's error message (or None) with all ranks, so all of them stop
    together with the same one-line reason instead of some waiting in a collective."""
    if not info.enabled:
        return message
    messages = gather_objects(info, message)
    return next((m for m in messages if m), None)
