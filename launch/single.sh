#!/usr/bin/env bash
# Single-process training on one GPU (or the CPU when none is visible).
#   launch/single.sh configs/gpt2_dolly_bf16.yaml [section.key=value ...]
# Every argument after the config is passed through as a config override.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG.yaml [section.key=value ...]" >&2
    exit 2
fi
config="$1"
shift
cmd=(python -m distrib_gpt.train --config "$config" "$@")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
