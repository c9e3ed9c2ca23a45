"""int8 inference on CPU: fp32 vs bf16 vs int8 (torchao), and our `generate` vs transformers'.

Two models, measured in one run:

- "trained": the quickstart shape (4 layers, 4 heads, 128 wide, 256 positions, GPT-2 vocabulary)
  trained here with configs/quickstart.yaml (3 epochs on the bundled sample, ~2 minutes), or
  any run's checkpoint with --checkpoint runs/NAME/checkpoint (its config.yaml names the
  validation data). Quality (validation loss), size and speed.
- "gpt2-124M": GPT-2 small's shape (12 layers, 12 heads, 768 wide, 1024 positions) with random
  weights (no pretrained weights offline): size and speed only; its loss means nothing.

Variants: fp32 and bf16 (consolidated checkpoints; bf16 = every tensor and the compute in
bf16), int8_dynamic, int8_weight_only and (trained model) int8_static (distrib_gpt.quantize,
torchao; LM head / token embedding included). For each: file bytes; validation loss; prefill
latency at batch 1; decode tokens/s at batch 1 and 8 and peak RSS, each variant in a fresh
process (`distrib_gpt.quantize.measure_in_subprocess`, the code behind quant_summary.json),
variants interleaved over --rounds rounds, medians reported.

Ours vs transformers: the fp32 weights exported in memory into a `GPT2LMHeadModel` (Linear
weights transposed back to Conv1D layout, vocabulary pad rows dropped), greedy, no end-of-text
stop, the same random prompt; both timed the same way in this process, alternating:
decode tokens/s = B * (N - 1) / (time of generate(N new) - time of generate(1 new)).

    python bench/int8_inference.py --out bench/results/int8_inference.json
    python bench/int8_inference.py --checkpoint runs/quickstart/checkpoint --skip-gpt2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distrib_gpt.checkpoint import load_consolidated, save_consolidated  # noqa: E402
from distrib_gpt.config import load_config  # noqa: E402
from distrib_gpt.generate import generate  # noqa: E402
from distrib_gpt.model import GPT, GPTConfig  # noqa: E402
from distrib_gpt.quantize import (  # noqa: E402
    calibration_batches,
    checkpoint_bytes,
    eval_loss,
    measure_in_subprocess,
    quantize_model,
    save_quantized,
    torchao_api,
    val_loader,
)
from distrib_gpt.tokenizer import EOT_ID  # noqa: E402

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def log(*a) -> None:
    print(*a, flush=True)


# ----------------------------------------------------------------------------- models


def trained_checkpoint(args, work: Path) -> tuple[Path, object]:
    """(checkpoint dir, config naming its validation data)."""
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        cfg = load_config(ckpt.parent / "config.yaml")
        return ckpt, cfg
    overrides = [f"run.out_dir={work}", "run.name=trained", f"data.cache_dir={work / 'cache'}", "train.progress=false"]
    cfg = load_config(ROOT / "configs/quickstart.yaml", overrides)
    from distrib_gpt.train import train

    log("training the quickstart model (configs/quickstart.yaml) ...")
    t0 = time.time()
    s = train(cfg)
    log(f"trained in {time.time() - t0:.0f}s, val loss by epoch {[round(x, 4) for x in s['val_loss_by_epoch']]}")
    return work / "trained" / "checkpoint", cfg


def hf_from_ours(model: GPT):
    """The same weights as a transformers GPT2LMHeadModel (in memory)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hc = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=EOT_ID, tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(hc).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to wte on both sides
        if k.endswith(CONV1D):
            v = v.t()
        if k == "transformer.wte.weight":
            v = v[: c.vocab_size]
        sd[k] = v.detach().clone()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"export to GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    ids = torch.randint(0, c.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"exported GPT2LMHeadModel disagrees with ours: max |logit diff| {diff}")
    return hf


def ours_vs_hf(model: GPT, args, rounds: int) -> dict:
    """Decode tokens/s of our generate and transformers' generate on the same fp32 weights."""
    hf = hf_from_ours(model)
    c = model.config
    n = min(args.new_tokens, c.block_size // 2)
    p = min(args.prompt_tokens, c.block_size - n)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, EOT_ID, (max(args.batch_sizes), p), generator=g)

    def run_ours(x, k):
        return generate(model, x, k, temperature=0, stop_at_eot=False).tokens

    def run_hf(x, k):
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, do_sample=False, pad_token_id=EOT_ID)
        return out[:, x.shape[1]:].tolist()

    with torch.no_grad():
        same = run_ours(prompts[:1], 8) == run_hf(prompts[:1], 8)  # greedy tokens agree (and warm-up)
        times = {(who, b, k): [] for who in ("ours", "hf") for b in args.batch_sizes for k in (1, n)}
        for _ in range(rounds):
            for b in args.batch_sizes:
                for k in (1, n):
                    for who, fn in (("ours", run_ours), ("hf", run_hf)):
                        t0 = time.perf_counter()
                        fn(prompts[:b], k)
                        times[(who, b, k)].append(time.perf_counter() - t0)
    out = {"greedy_tokens_match": same, "prompt_tokens": p, "new_tokens": n}
    for b in args.batch_sizes:
        for who in ("ours", "hf"):
            dt = statistics.median(times[(who, b, n)]) - statistics.median(times[(who, b, 1)])
            out[f"{who}_decode_tokens_per_s_batch{b}"] = b * (n - 1) / dt
        out[f"ours_vs_hf_batch{b}"] = out[f"ours_decode_tokens_per_s_batch{b}"] / out[f"hf_decode_tokens_per_s_batch{b}"]
    return out


# ----------------------------------------------------------------------------- variants


def build_variants(name: str, ckpt: Path, work: Path, methods: list[str], cfg=None) -> dict[str, dict]:
    """Checkpoint dir (and validation loss when cfg names data) of every variant."""
    variants: dict[str, dict] = {"fp32": {"dir": ckpt, "dtype": None}}
    fp = load_consolidated(ckpt).eval()
    bf16_dir = save_consolidated(fp, work / f"{name}_bf16", "bf16")
    variants["bf16"] = {"dir": bf16_dir, "dtype": "bf16"}
    loader = calib = None
    if cfg is not None:
        prepared, loader = val_loader(cfg)
        calib = calibration_batches(prepared.dir, cfg.quantize.calib_examples, cfg.data.seq_len, torch.device("cpu"))
        variants["fp32"]["val_loss"] = eval_loss(fp, loader, cfg.eval.val_batches, torch.device("cpu"))["loss"]
        variants["bf16"]["val_loss"] = eval_loss(fp.to(torch.bfloat16), loader, cfg.eval.val_batches, torch.device("cpu"))["loss"]
    for method in methods:
        model = load_consolidated(ckpt).eval()
        t0 = time.perf_counter()
        layers = quantize_model(model, method, calib_batches=calib)
        entry = {"quantize_s": time.perf_counter() - t0, "quantized_layers": len(layers), "dtype": None}
        if loader is not None:
            entry["val_loss"] = eval_loss(model, loader, cfg.eval.val_batches, torch.device("cpu"))["loss"]
        entry["dir"] = save_quantized(model, layers, work / f"{name}_{method}", method)
        variants[method] = entry
    for v in variants.values():
        v["file_bytes"] = checkpoint_bytes(v["dir"])
    return variants


def measure_variants(variants: dict[str, dict], args, rounds: int) -> None:
    opts = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batch_sizes=args.batch_sizes, repeats=args.repeats)
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(rounds):
        for name, v in variants.items():
            m = measure_in_subprocess(v["dir"], torch.device("cpu"), dict(opts, dtype=v["dtype"]))
            runs[name].append(m)
            log(
                f"  round {r + 1} {name:<17} prefill {m['prefill_ms_batch1']:8.1f} ms | decode tok/s "
                + " ".join(f"b{b}: {t:7.1f}" for b, t in m["decode_tokens_per_s"].items())
                + f" | peak RSS {m['peak_rss_bytes'] / 2**20:7.1f} MiB"
            )
    for name, v in variants.items():
        ms = runs[name]
        v["prefill_ms_batch1"] = statistics.median(m["prefill_ms_batch1"] for m in ms)
        v["decode_tokens_per_s"] = {b: statistics.median(m["decode_tokens_per_s"][b] for m in ms) for b in ms[0]["decode_tokens_per_s"]}
        v["peak_rss_bytes"] = statistics.median(m["peak_rss_bytes"] for m in ms)
        v["peak_rss_above_baseline_bytes"] = statistics.median(m["peak_rss_above_baseline_bytes"] for m in ms)
        v["prompt_tokens"], v["new_tokens"] = ms[0]["prompt_tokens"], ms[0]["new_tokens"]
        v["rounds"] = ms


def table(title: str, variants: dict[str, dict]) -> str:
    fp = variants["fp32"]
    lines = [
        title,
        f"{'variant':<17} {'file MiB':>9} {'size':>6} {'val loss':>9} {'delta':>8} {'prefill ms':>10} "
        f"{'dec b1':>8} {'x fp32':>7} {'dec b8':>8} {'x fp32':>7} {'peak RSS MiB':>12} {'above base':>10}",
    ]
    for name, v in variants.items():
        loss = v.get("val_loss")
        delta = f"{(loss - fp['val_loss']) / fp['val_loss']:+.2%}" if loss is not None else "-"
        d = v["decode_tokens_per_s"]
        lines.append(
            f"{name:<17} {v['file_bytes'] / 2**20:9.2f} {v['file_bytes'] / fp['file_bytes']:6.1%} "
            f"{(f'{loss:.4f}' if loss is not None else '-'):>9} {delta:>8} {v['prefill_ms_batch1']:10.1f} "
            f"{d['1']:8.1f} {d['1'] / fp['decode_tokens_per_s']['1']:6.2f}x {d['8']:8.1f} "
            f"{d['8'] / fp['decode_tokens_per_s']['8']:6.2f}x {v['peak_rss_bytes'] / 2**20:12.1f} "
            f"{v['peak_rss_above_baseline_bytes'] / 2**20:10.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trained checkpoint (its run's config.yaml names the data); default: train quickstart")
    p.add_argument("--skip-gpt2", action="store_true", help="skip the GPT-2 124M-shaped (random weights) model")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per batch size inside each measurement")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the variants; medians reported")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    if 1 not in args.batch_sizes or 8 not in args.batch_sizes:
        p.error("--batch-sizes must include 1 and 8 (the table compares them)")

    started = time.time()
    result: dict = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "torchao": torchao_api()["version"],
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, cfg = trained_checkpoint(args, work)
        log("trained model: building variants ...")
        trained = build_variants("trained", ckpt, work, ["int8_dynamic", "int8_weight_only", "int8_static"], cfg)
        log("trained model: measuring (fresh process per variant) ...")
        measure_variants(trained, args, args.rounds)
        log("trained model: ours vs transformers generate (fp32) ...")
        hf_trained = ours_vs_hf(load_consolidated(ckpt).eval(), args, args.rounds)
        result["trained"] = {"variants": trained, "ours_vs_hf": hf_trained, "shape": load_consolidated(ckpt).config.__dict__}

        if not args.skip_gpt2:
            log("gpt2-124M shape (random weights): building variants ...")
            torch.manual_seed(0)
            big = GPT(GPTConfig.from_name("gpt2"))
            big_dir = save_consolidated(big, work / "gpt2_fp32", "fp32")
            del big
            gvars = build_variants("gpt2", big_dir, work, ["int8_dynamic", "int8_weight_only"])
            log("gpt2-124M: measuring ...")
            measure_variants(gvars, args, args.rounds)
            log("gpt2-124M: ours vs transformers generate (fp32) ...")
            hf_big = ours_vs_hf(load_consolidated(big_dir).eval(), args, args.rounds)
            result["gpt2_124m_random"] = {"variants": gvars, "ours_vs_hf": hf_big}

        for section in ("trained", "gpt2_124m_random"):
            for v in result.get(section, {}).get("variants", {}).values():
                v["dir"] = str(v["dir"]).replace(str(work), "<tmp>")

    result["wall_time_s"] = time.time() - started
    print()
    print(table("trained (quickstart shape)" if not args.checkpoint else f"trained ({args.checkpoint})", result["trained"]["variants"]))
    print(f"ours vs transformers (fp32): {json.dumps(result['trained']['ours_vs_hf'])}")
    if "gpt2_124m_random" in result:
        print()
        print(table("gpt2-124M shape, random weights (loss not meaningful)", result["gpt2_124m_random"]["variants"]))
        print(f"ours vs transformers (fp32): {json.dumps(result['gpt2_124m_random']['ours_vs_hf'])}")
    print(f"\nwall time {result['wall_time_s']:.0f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
