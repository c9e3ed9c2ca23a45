"""Config overrides for a seconds-long CPU training run, shared by the tests that start real
runs (tests/test_distributed.py, test_resume.py, test_lora.py): a 2-layer, 32-wide GPT from
scratch on 80 bundled examples at sequence length 64. Each test file adds what it varies
(epochs, steps, checkpoint cadence, learning rate, LoRA); a later override wins."""

from __future__ import annotations

from pathlib import Path


def tiny_run(cache: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "model.name=custom", "model.init=scratch", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "data.max_examples=80", "data.seq_len=64", f"data.cache_dir={cache}",
        f"run.out_dir={out}", f"run.name={name}", "run.device=cpu", "train.progress=false", "train.log_every=1",
        "optim.lr=3e-3", "optim.warmup_steps=1", "eval.train_subset_batches=2", "eval.val_batches=2", *extra,
    ]
