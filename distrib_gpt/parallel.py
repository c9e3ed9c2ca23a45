"""How the model is wrapped for a strategy: the one place that decides it.

`parallelize` applies, in this order (as torchtitan pins it): activation checkpointing per
transformer block, `torch.compile` per block, then the data-parallel wrapper. Compiling
blocks rather than the whole model keeps compile time flat in depth and lets FSDP hooks stay
outside the compiled graphs (under FSDP with fp16/bf16, where each block's LayerNorms are a
unit of their own, the attention and the MLP are compiled instead, for the same reason);
checkpointing before compiling lets the compiler see the recomputation.

| strategy       | what is sharded                      | ZeRO stage | wrapper                                   |
| -------------- | ------------------------------------ | ---------- | ----------------------------------------- |
| `single`       | nothing (one process)                | -          | none                                      |
| `ddp`          | nothing; gradients all-reduced       | -          | DistributedDataParallel                   |
| `zero1`        | optimizer states                     | 1          | DDP + ZeroRedundancyOptimizer             |
| `fsdp_grad_op` | optimizer states + gradients (params kept unsharded between forward and backward) | 2-like | FSDP2 `fully_shard(reshard_after_forward=False)` |
| `fsdp_full`    | optimizer states + gradients + parameters | 3     | FSDP2 `fully_shard(reshard_after_forward=True)` |
| `hsdp`         | `fsdp_full` within a node, replicated across nodes | 3 within a node | FSDP2 on a 2-D mesh (replicate, shard) |

FSDP units: one per transformer block, plus the root (embeddings, final LayerNorm and the LM
head). The token embedding and the LM head are one Parameter (tied), so they share a unit.
Under fp16/bf16 each block's two LayerNorms are one more unit, kept in fp32 like the root
(precision.PrecisionPolicy.fsdp_mixed_precision says why).

Under FSDP the model arrives on the meta device (train.build_parallel_model): each rank
allocates only its shards and `load_full_state_dict` fills them from rank 0.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, ParallelConfig
from .distributed import DistInfo
from .model import GPT
from .precision import PrecisionPolicy

FSDP_STRATEGIES = ("fsdp_full", "fsdp_grad_op", "hsdp")
DDP_STRATEGIES = ("ddp", "zero1")


@dataclass
class Parallelized:
    model: nn.Module
    """What the train step calls (the wrapper, or the model itself)."""
    inner: GPT
    """The plain model (for its config and parameter counts; under FSDP its parameters are
    sharded DTensors)."""
    strategy: str
    comm: "CommCounter" = field(default_factory=lambda: CommCounter())


@dataclass
class CommCounter:
    """Bytes this rank sent to collectives for gradients, counted by a DDP comm hook."""

    bytes: int = 0
    calls: int = 0


def check_strategy(cfg: ParallelConfig, info: DistInfo) -> None:
    """Fail at start-up, naming the key, when the strategy cannot run in this job."""
    s = cfg.strategy
    if s == "single" and info.world_size > 1:
        raise ConfigError(
            f"parallel.strategy: 'single' runs one process but WORLD_SIZE={info.world_size}; "
            "use ddp, zero1, fsdp_full, fsdp_grad_op or hsdp under torchrun"
        )
    if s != "single" and not info.enabled:
        # a one-process group is still a valid DDP/FSDP job; torchrun is what creates it
        raise ConfigError(
            f"parallel.strategy: '{s}' needs a process group; launch with torchrun "
            "(e.g. torchrun --nproc_per_node=1 -m distrib_gpt.train ...) or use strategy=single"
        )
    if s == "hsdp":
        replicas = cfg.hsdp_replicas or info.num_nodes
        if info.world_size % replicas != 0:
            raise ConfigError(
                f"parallel.hsdp_replicas: {replicas} replica groups do not divide WORLD_SIZE={info.world_size}"
            )


def hsdp_mesh_shape(cfg: ParallelConfig, info: DistInfo) -> tuple[int, int]:
    replicas = cfg.hsdp_replicas or info.num_nodes
    return replicas, info.world_size // replicas


def parallelize(model: GPT, cfg: ParallelConfig, policy: PrecisionPolicy, info: DistInfo, device: torch.device) -> Parallelized:
    """Wrap `model` for `cfg.strategy`. Under FSDP the model may be on the meta device (what
    train.build_parallel_model gives it): fully_shard then only records the shards, and the
    caller allocates them with to_empty and fills them (load_full_state_dict)."""
    model.activation_checkpointing = cfg.activation_checkpointing
    s = cfg.strategy
    # FSDP with half-precision compute gives the blocks' LayerNorms FSDP units of their own
    # (see below); their hooks inside a compiled block would split its graph, so then the
    # attention and the MLP are compiled instead, and the hooks stay outside compiled code
    norm_units = s in FSDP_STRATEGIES and policy.autocast_dtype is not None
    if cfg.compile:
        for block in model.transformer.h:
            for part in (block.attn, block.mlp) if norm_units else (block,):
                part.compile()  # in place: parameter names (and checkpoint keys) stay plain
    if s == "single":
        return Parallelized(model, model, s)
    if s in DDP_STRATEGIES:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        counter = CommCounter()
        ddp.register_comm_hook(counter, _counting_allreduce_hook)
        return Parallelized(ddp, model, s, counter)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if s == "hsdp":
        mesh = init_device_mesh(device.type, hsdp_mesh_shape(cfg, info), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (info.world_size,), mesh_dim_names=("shard",))
    # half-precision compute: matmul weights are gathered in the compute dtype, everything
    # else in fp32, exactly as autocast treats them under DDP (see fsdp_mixed_precision)
    matmul = policy.fsdp_mixed_precision(cfg.reduce_dtype, matmul_only=True)
    fp32 = policy.fsdp_mixed_precision(cfg.reduce_dtype, matmul_only=False)
    reshard = s != "fsdp_grad_op"
    for block in model.transformer.h:
        if norm_units:
            # FSDP2 has one dtype per unit, so the LayerNorms get a unit of their own to stay
            # fp32 (CPU autocast, unlike CUDA's, does not upcast layer_norm, which refuses
            # half weights next to the fp32 residual stream); under fp32 it would be a no-op
            fully_shard([block.ln_1, block.ln_2], mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard)
        fully_shard(block, mesh=mesh, mp_policy=matmul, reshard_after_forward=reshard)
    # the root keeps wte (= lm_head), wpe and ln_f; its parameters are needed again right at
    # the end of forward (the LM head), so it is never resharded after forward
    fully_shard(model, mesh=mesh, mp_policy=fp32, reshard_after_forward=False)
    return Parallelized(model, model, s)


def _counting_allreduce_hook(state, bucket):
    """DDP's own all-reduce (divide by world size, then sum), counting the bucket's bytes.
    (No annotations: DDP checks them at registration, and this module's are strings.)"""
    buf = bucket.buffer()
    state.bytes += buf.numel() * buf.element_size()
    state.calls += 1
    buf.div_(dist.get_world_size())
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


@contextlib.contextmanager
def gradient_sync(p: Parallelized, sync: bool) -> Iterator[None]:
    """Skip the gradient reduction on non-final micro-batches of an accumulated step."""
    if p.strategy in DDP_STRATEGIES and not sync:
        with p.model.no_sync():
            yield
        return
    if p.strategy in FSDP_STRATEGIES:
        p.model.set_requires_gradient_sync(sync)
    yield


def grad_norm_to_tensor(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor under FSDP; the value is the same on every rank."""
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


def full_state_dict(p: Parallelized) -> dict[str, torch.Tensor]:
    """The plain model's full state dict on CPU, on rank 0; the other ranks get {} (every
    rank must call this: under FSDP it gathers the shards, and torch's cpu_offload option
    keeps the result on rank 0 only). Under DDP every rank holds the whole model already;
    a host copy on each of them, though only rank 0 writes it, would multiply the host
    memory by the ranks per node (gpt2-xl on 8 GPUs: ~50 GB)."""
    if p.strategy in FSDP_STRATEGIES:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(p.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {k: v.detach().cpu() for k, v in p.inner.state_dict().items()}


def load_full_state_dict(p: Parallelized, state: dict[str, torch.Tensor]) -> None:
    """Fill a sharded model whose shards were just allocated (to_empty) from rank 0's full
    state dict; the other ranks pass {}. Every rank must call this.

    Tensor by tensor, rank 0 cuts the full tensor into FSDP's dim-0 chunks (ceil(rows / S)
    rows each, the last zero-padded) and scatters them, so a rank never receives more than
    its own chunk. (torch's set_model_state_dict(broadcast_from_rank0=True) broadcasts every
    whole tensor to every rank: with the 50304-row embedding in flight next to its shards,
    rank 1's peak RSS grew by 211 MB for a 204 MB model, against 96 MB this way; see
    tests/test_fsdp_init.py.) HSDP: each replica group gets the same chunks."""
    from torch.distributed.tensor import Shard

    rank = dist.get_rank()
    with torch.no_grad():
        for name, param in p.model.named_parameters():  # the tied embedding once
            assert param.placements[-1] == Shard(0), (name, param.placements)
            local = param.to_local()  # a view of FSDP's shard storage
            mesh = param.device_mesh.mesh  # global ranks; the last dim is the shard group
            shards = mesh.shape[-1]
            rows = -(-param.shape[0] // shards)
            chunk = local if local.shape[0] == rows else local.new_empty((rows, *param.shape[1:]))
            scatter = None
            if rank == 0:
                full = state[name].to(device=local.device, dtype=local.dtype)
                if rows * shards != full.shape[0]:
                    full = torch.cat([full, full.new_zeros((rows * shards - full.shape[0], *full.shape[1:]))])
                pieces = full.view(shards, rows, *full.shape[1:])
                # rank r gets the chunk of its position in its shard group
                where = {r: i for group in mesh.reshape(-1, shards).tolist() for i, r in enumerate(group)}
                scatter = [pieces[where[r]] for r in range(dist.get_world_size())]
            dist.scatter(chunk, scatter, src=0)
            if chunk is not local:
                local.copy_(chunk[: local.shape[0]])
        for name, buf in p.model.named_buffers():  # unsharded: the same on every rank
            if rank == 0:
                buf.copy_(state[name])
            dist.broadcast(buf, src=0)


def fsdp_comm_bytes_per_step(
    p: Parallelized, policy: PrecisionPolicy, cfg: ParallelConfig, info: DistInfo, micro_batches: int = 1
) -> int:
    """Bytes one rank sends per optimizer step under FSDP/HSDP, computed from the sharded
    sizes (torch exposes no byte counter for FSDP2's collectives).

    Ring collectives over a group of S ranks: an all-gather or a reduce-scatter of S bytes
    makes each rank send (S-1)/S of them, an all-reduce 2 (S-1)/S. Forward all-gathers every
    unit's parameters: the blocks' matmul weights in the compute dtype, the root
    (embeddings, ln_f, the tied LM head) and the blocks' LayerNorms in fp32 (see
    `PrecisionPolicy.fsdp_mixed_precision`); `fsdp_full` gathers the blocks again in
    backward (they were resharded after forward); backward reduce-scatters the gradients (in
    `parallel.reduce_dtype`). So ~3x the parameter bytes for fsdp_full, ~2x for fsdp_grad_op.
    HSDP shards within groups of S = W / R ranks, then all-reduces each gradient shard across
    the R replicas. With gradient accumulation the gathers happen on every micro-batch, the
    gradient reduction only on the last."""
    blocks = p.inner.transformer.h
    n_params = sum(t.numel() for t in p.inner.parameters())
    block_params = sum(t.numel() for b in blocks for t in b.parameters())
    norm_params = sum(t.numel() for b in blocks for ln in (b.ln_1, b.ln_2) for t in ln.parameters())
    matmul_params = block_params - norm_params
    compute_bytes = torch.finfo(policy.compute_dtype).bits // 8
    grad_bytes = 4 if cfg.reduce_dtype == "fp32" else compute_bytes
    replicas, shard = hsdp_mesh_shape(cfg, info) if p.strategy == "hsdp" else (1, info.world_size)
    gathered = matmul_params * compute_bytes + (n_params - matmul_params) * 4
    if p.strategy != "fsdp_grad_op":
        gathered += matmul_params * compute_bytes + norm_params * 4  # the blocks, re-gathered in backward
    # only parameters with a gradient are reduced (FSDP2 skips frozen ones: LoRA's base weights)
    n_trained = sum(t.numel() for t in p.inner.parameters() if t.requires_grad)
    within = (shard - 1) / shard * (micro_batches * gathered + n_trained * grad_bytes)
    across = 2 * (replicas - 1) / replicas * n_trained * grad_bytes / shard
    return int(within + across)
