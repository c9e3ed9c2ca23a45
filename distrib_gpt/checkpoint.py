"""Consolidated checkpoints: safetensors weights plus the model's config.

Layout of a checkpoint directory:

    model.safetensors   every tensor of the plain model (no wrapper prefixes); the LM head
                        is tied to the token embedding, so only `transformer.wte.weight` is
                        stored and the tie is restored on load
    config.json         the GPTConfig fields, plus the dtype the tensors were written in

Writes go to a temporary sibling directory that is renamed into place, so a crash never
leaves a half-written checkpoint under the final name. Loading uses safetensors only: no
pickle, so a checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED = "lm_head.weight"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of another shape; the message names the file."""


def save_consolidated(model: GPT, out_dir: Path, dtype: str = "fp32") -> Path:
    """Write `model` to `out_dir` atomically; returns the directory."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {
            k: v.detach().to(device="cpu", dtype=DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous()
            for k, v in model.state_dict().items()
            if k != TIED
        }
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "distrib_gpt": "1"})
        meta = {"model": dataclasses.asdict(model.config), "dtype": dtype, "tied": {TIED: "transformer.wte.weight"}}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_consolidated(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> GPT:
    """Rebuild a GPT from a consolidated checkpoint directory (fp32 parameters)."""
    ckpt_dir = Path(ckpt_dir)
    cfg_path, weights_path = ckpt_dir / CONFIG, ckpt_dir / WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: checkpoint file not found")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        config = GPTConfig(**meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not a distrib_gpt checkpoint config ({e})") from None
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: corrupt or truncated safetensors file ({e})") from None
    model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: keys do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointError(f"{weights_path}: {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(shape)}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte
    return model.to(map_location)
