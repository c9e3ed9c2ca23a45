#!/usr/bin/env bash
# torchrun on this node: one node (standalone) or one of several (c10d rendezvous).
#
#   launch/torchrun.sh CONFIG.yaml [section.key=value ...]
#
# Every argument after the config is a config override. Set in the environment:
#   NPROC_PER_NODE  worker processes on this node   [SLURM_GPUS_ON_NODE, else visible GPUs, else 1]
#   NNODES          nodes (torchrun agents) in the job                                        [1]
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, the same on every node   [needed if NNODES>1]
#   RDZV_ID         a job id shared by every node                                   [distrib-gpt]
#   MAX_RESTARTS    elastic restarts of the whole worker group after a failure                [0]
#   PYTHON          the interpreter with distrib_gpt installed                          [python]
#
# Two nodes x 4 GPUs, the same command on each node (node0 is the first node's hostname):
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node0:29500 RDZV_ID=exp1 \
#       launch/torchrun.sh configs/gpt2_dolly_bf16.yaml parallel.strategy=fsdp_full
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG.yaml [section.key=value ...]  (see the comments at the top of $0)" >&2
    exit 2
fi
config="$1"
shift
if [ ! -f "$config" ]; then
    echo "$0: config file not found: $config" >&2
    exit 2
fi

python="${PYTHON:-python}"
nnodes="${NNODES:-1}"
if [ -n "${NPROC_PER_NODE:-}" ]; then
    nproc="$NPROC_PER_NODE"
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    nproc="$SLURM_GPUS_ON_NODE"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nproc="$(nvidia-smi -L | grep -c '^GPU')"
else
    nproc=1
fi

# NCCL/torch settings that matter on T4/A100 clusters (docs/launch.md); the user's values win.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a hung collective fails the job
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

cmd=("$python" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-0}")
if [ "$nnodes" = 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    cmd+=(--standalone)
else
    if [ -z "${RDZV_ENDPOINT:-}" ]; then
        echo "$0: NNODES=$nnodes needs RDZV_ENDPOINT=host:port (the same on every node)" >&2
        exit 2
    fi
    cmd+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-distrib-gpt}")
fi
cmd+=(-m distrib_gpt.train --config "$config" "$@")

echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
