"""The three batching modes compared: what the model learns, and how fast.

(a) `pad`: one example per row. (b) `pack`: whole examples packed into rows, each attending
only to itself from position 0 (document-masked). (c) `pack_concat`: the same rows read as
one text (each example sees the unrelated ones before it, at later positions).

Quality: on each data set, the same small GPT-2-shaped model is trained from the same random
init for the same number of optimizer steps in each mode, each seeing about the same examples
per step (pad's micro-batch is `--rows` times the mean examples per packed row), then its
final checkpoint is evaluated on the same validation examples, each alone from position 0
(`distrib-gpt eval ... data.batching=pad`: one example per row). Data sets: the bundled
Dolly-schema sample, and Dolly-schema records this script writes (a copy task: the response
repeats a number from the instruction, so attending to the wrong example costs visibly).

A control, (a') `pad` without length bucketing (each batch a random draw of examples, as
pack's rows are), shows how much of a difference between (a) and (b) comes from pad
grouping examples of similar length into the same steps.

Speed: real (non-pad) input tokens/s of the three modes and the control on the bundled
sample, short runs in fresh processes, in rounds whose order rotates (one interleaved run);
medians reported.

    python bench/packing.py --out bench/results/packing.json     # ~15 minutes on 2 cores
    python bench/packing.py --steps 20 --speed-steps 10 --rounds 1   # a quick look

`python bench/tables.py` turns the JSON into the tables of docs/data.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import environment, other_load, write_results  # noqa: E402

MODES = ("pad", "pack", "pack_concat")


def synthetic_records(n: int) -> list[dict]:
    """Dolly-schema records whose answer repeats a number from the instruction (learnable by
    a small model in a few hundred steps, and only by attending to its own prompt)."""
    words = ["apple", "river", "stone", "cloud", "garden", "pencil", "window", "engine"]
    rows = []
    for i in range(n):
        k = (i * 7919) % 1000
        w = words[i % len(words)]
        rows.append({
            "instruction": f"Which number is written on the {w} in item {k}?",
            "context": f"Item {k} is a {w} marked with the number {k}." if i % 2 == 0 else "",
            "response": f"The {w} shows the number {k}." + " That is all." * (i % 5),
            "category": "closed_qa",
        })
    return rows


def overrides(args, work: Path, source: str, mode: str, tag: str, batch: int, steps: int) -> list[str]:
    return [
        "model.name=custom", "model.init=scratch", f"model.n_layer={args.n_layer}", f"model.n_head={args.n_head}",
        f"model.n_embd={args.n_embd}", f"model.block_size={args.seq_len}", "model.dropout=0.0",
        f"data.source={source}", f"data.max_examples={args.examples}", f"data.seq_len={args.seq_len}",
        f"data.batching={mode}", f"data.cache_dir={work / 'cache'}",
        f"run.out_dir={work / 'runs'}", f"run.name={tag}", "run.device=cpu", "run.overwrite=true",
        f"run.seed={args.seed}", "precision=fp32", "train.epochs=1000", f"train.max_steps={steps}",
        f"train.micro_batch_size={batch}", "train.progress=false", f"train.log_every={steps}",
        f"optim.lr={args.lr}", "optim.warmup_steps=10", "eval.train_subset_batches=1", "eval.val_batches=1",
        "checkpoint.every_epoch=false", "quantize.after_training=false",
    ]


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{out.stderr[-3000:]}")
    return out.stdout


# `pad` without its length bucketing (each batch a random draw of examples): the control
# that tells whether pad's loss differs from pack's because of what its batches group
UNBUCKETED = (
    "import sys; import distrib_gpt.data.loader as L; L.PAD_BUCKET_BATCHES = 1; "
    "from distrib_gpt.cli import main; sys.exit(main(sys.argv[1:]))"
)


def train(args, work: Path, source: str, mode: str, tag: str, batch: int, steps: int, save: bool) -> dict:
    extra = [] if save else ["checkpoint.save_final=false"]
    if mode == "pad_unbucketed":
        head, mode = [sys.executable, "-c", UNBUCKETED], "pad"
    else:
        head = [sys.executable, "-m", "distrib_gpt"]
    run([*head, "train", *overrides(args, work, source, mode, tag, batch, steps), *extra])
    return json.loads((work / "runs" / tag / "summary.json").read_text())


def eval_alone(work: Path, tag: str) -> dict:
    """The run's final checkpoint on every validation example, each alone from position 0."""
    ckpt = work / "runs" / tag / "checkpoint"
    out = run([sys.executable, "-m", "distrib_gpt", "eval", "--checkpoint", str(ckpt), "--json",
               "data.batching=pad", "eval.val_batches=null"])
    return json.loads(out.strip().splitlines()[-1])


def examples_per_row(args, work: Path, source: str) -> float:
    """Mean examples per packed row on the training split (what pad's micro-batch is scaled by)."""
    from distrib_gpt.config import load_config
    from distrib_gpt.data import BatchLoader, TokenizedSplit, prepare_data

    cfg = load_config(None, overrides(args, work, source, "pack", "probe", args.rows, 1))
    split = TokenizedSplit.open(prepare_data(cfg.data, log=lambda *a: None).dir, "train")
    plan = BatchLoader(split, "pack", args.seq_len, args.rows, seed=args.seed).plan()
    return len(plan.examples) / (len(plan.row_start) - 1)


def padding_by_seq_len(work: Path, batch: int) -> dict[str, dict[str, float]]:
    """Padding fraction of one epoch's batches of the bundled sample's train split, per
    seq_len and mode (no training: the loader's batches only)."""
    from distrib_gpt.config import DataConfig
    from distrib_gpt.data import BatchLoader, TokenizedSplit, prepare_data

    out: dict[str, dict[str, float]] = {}
    for seq in (256, 512, 1024):
        prepared = prepare_data(DataConfig(seq_len=seq, cache_dir=str(work / "cache")), log=lambda *a: None)
        split = TokenizedSplit.open(prepared.dir, "train")
        out[str(seq)] = {}
        for mode in MODES:
            batches = list(BatchLoader(split, mode, seq, batch, seed=0))
            pad, real = sum(b.n_pad for b in batches), sum(b.n_real_tokens for b in batches)
            out[str(seq)][mode] = pad / (pad + real)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=8, help="packed rows per micro-batch")
    p.add_argument("--examples", type=int, default=2000, help="records of each data set")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each quality run")
    p.add_argument("--speed-steps", type=int, default=60, help="optimizer steps of each speed run")
    p.add_argument("--rounds", type=int, default=3, help="speed rounds (order rotates); medians reported")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    env = environment()
    t0 = time.time()
    quality: dict[str, dict] = {}
    speed: dict[str, list[float]] = {m: [] for m in (*MODES, "pad_unbucketed")}
    with tempfile.TemporaryDirectory() as tmp, other_load() as load:
        work = Path(tmp)
        padding = padding_by_seq_len(work, args.rows)
        synthetic = work / "synthetic.jsonl"
        synthetic.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(args.examples)), encoding="utf-8")
        for name, source in (("bundled", "bundled"), ("synthetic", str(synthetic))):
            per_row = examples_per_row(args, work, source)
            pad_batch = round(args.rows * per_row)
            quality[name] = {"examples_per_packed_row": per_row, "modes": {}}
            for mode in (*MODES, "pad_unbucketed"):
                batch = pad_batch if mode.startswith("pad") else args.rows
                tag = f"{name}-{mode}"
                s = train(args, work, source, mode, tag, batch, args.steps, save=True)
                e = eval_alone(work, tag)
                quality[name]["modes"][mode] = {
                    "micro_batch_size": batch, "steps": s["steps"], "val_loss_alone": e["loss"],
                    "val_tokens": e["tokens"], "final_train_loss": s["train_loss_by_epoch"][-1],
                    "supervised_tokens": s["supervised_tokens"], "padding_fraction": s["padding_fraction"],
                    "tokens_per_s": s["tokens_per_s"],
                }
                print(f"{name} {mode}: val loss alone {e['loss']:.4f} (train {s['train_loss_by_epoch'][-1]:.4f}), "
                      f"{s['tokens_per_s']:,.0f} tok/s, padding {s['padding_fraction']:.1%}", flush=True)
        pad_batch = round(args.rows * quality["bundled"]["examples_per_packed_row"])
        for r in range(args.rounds):
            modes = list(speed)
            for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
                batch = pad_batch if mode.startswith("pad") else args.rows
                s = train(args, work, "bundled", mode, f"speed-{mode}", batch, args.speed_steps, save=False)
                speed[mode].append(s["tokens_per_s"])
            print(f"speed round {r + 1}: " + ", ".join(f"{m} {v[-1]:,.0f}" for m, v in speed.items()), flush=True)
    med = {m: statistics.median(v) for m, v in speed.items()}
    out = {
        "settings": vars(args) | {"out": None},
        "padding_by_seq_len": padding,
        "quality": quality,
        "speed_tokens_per_s": speed,
        "speed_median_tokens_per_s": med,
        "ratio_pack_vs_pack_concat": med["pack"] / med["pack_concat"],
        "ratio_pack_vs_pad": med["pack"] / med["pad"],
        "ratio_pack_vs_pad_unbucketed": med["pack"] / med["pad_unbucketed"],
        "other_cpu_share": load["share"],
        "wall_time_s": time.time() - t0,
        "environment": env,
    }
    print(f"pack / pack_concat {out['ratio_pack_vs_pack_concat']:.2f}x, pack / pad {out['ratio_pack_vs_pad']:.2f}x")
    if args.out:
        write_results(args.out, out)


if __name__ == "__main__":
    main()
