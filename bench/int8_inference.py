"""int8 inference on CPU: fp32 vs bf16 vs int8, per-kernel timings, and our `generate` vs
transformers'.

Kernels first (--kernels-only runs just this): one Linear layer of each GPT-2 124M shape
(in x out: 768 x 2304, 768 x 768, 768 x 3072, 3072 x 768, and the 768 x 50,304 LM head) at
batch 1, timed with fp32 and bf16 `F.linear`, torchao 0.18's int8_dynamic and int8_weight_only
linears, ATen's `torch._weight_int8pack_mm`, and fbgemm's dynamic int8 linear as
`distrib_gpt.quantize.Int8DynamicLinearCPU` runs it. Each is timed over enough copies of the
layer (at least 96 MB of int8 weights, 3 copies of the head) that the weights come from DRAM,
as in decoding, not from the 32 MB L3; kernels interleaved over rounds, medians reported.

Then two models:

- "trained": the quickstart shape (4 layers, 4 heads, 128 wide, 256 positions, GPT-2 vocabulary)
  trained here with configs/quickstart.yaml (3 epochs on the bundled sample, ~2 minutes), or
  any run's checkpoint with --checkpoint runs/NAME/checkpoint (its config.yaml names the
  validation data). Quality (validation loss), size and speed.
- "gpt2-124M": GPT-2 small's shape (12 layers, 12 heads, 768 wide, 1024 positions) with random
  weights (no pretrained weights offline): size and speed only; its loss means nothing.

Variants: fp32 and bf16 (consolidated checkpoints; bf16 = every tensor and the compute in
bf16); int8_dynamic (the default: torchao quantizes, fbgemm computes on the CPU), the same
file computed by torchao's own kernel ("int8_dynamic/torchao"), int8_dynamic with the tied
LM head / embedding left in fp32 ("int8_dynamic/fp_head", quantize.lm_head=false),
int8_weight_only and (trained model) int8_static. For each: file bytes; validation loss; prefill
latency at batch 1; decode tokens/s at batch 1 and 8 and peak RSS, each variant in a fresh
process (`distrib_gpt.quantize.measure_in_subprocess`, the code behind quant_summary.json),
variants interleaved over --rounds rounds, medians reported.

Ours vs transformers: the fp32 weights exported in memory into a `GPT2LMHeadModel` (Linear
weights transposed back to Conv1D layout, vocabulary pad rows dropped), greedy, no end-of-text
stop, the same random prompt; both timed the same way in this process, alternating:
decode tokens/s = B * (N - 1) / (time of generate(N new) - time of generate(1 new)).

    python bench/int8_inference.py --out bench/results/int8_inference.json
    python bench/int8_inference.py --checkpoint runs/quickstart/checkpoint --skip-gpt2
    python bench/int8_inference.py --kernels-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distrib_gpt.checkpoint import load_consolidated, save_consolidated
from distrib_gpt.config import load_config
from distrib_gpt.generate import generate
from distrib_gpt.model import GPT, GPTConfig
from distrib_gpt.quantize import (
    Int8DynamicLinearCPU,
    calibration_batches,
    checkpoint_bytes,
    eval_loss,
    fbgemm_available,
    measure_in_subprocess,
    quantize_model,
    save_quantized,
    torchao_api,
    val_loader,
)
from distrib_gpt.tokenizer import EOT_ID
from bench.machine import other_load, wait_quiet, write_results  # noqa: E402

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# label: (quantize.method, quantize.lm_head, int8 kernel)
INT8_VARIANTS = {
    "int8_dynamic": ("int8_dynamic", True, "auto"),
    "int8_dynamic/torchao": ("int8_dynamic", True, "torchao"),
    "int8_dynamic/fp_head": ("int8_dynamic", False, "auto"),
    "int8_weight_only": ("int8_weight_only", True, "auto"),
    "int8_static": ("int8_static", True, "auto"),
}
KERNEL_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50304)]


def log(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------- a shared machine


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

    if args.quiet_wait:
        wait_quiet(args.quiet_wait)
    with torch.no_grad(), other_load() as load:
        same = run_ours(prompts[:1], 8) == run_hf(prompts[:1], 8)  # greedy tokens agree (and warm-up)
        times = {(who, b, k): [] for who in ("ours", "hf") for b in args.batch_sizes for k in (1, n)}
        for _ in range(rounds):
            for b in args.batch_sizes:
                for k in (1, n):
                    for who, fn in (("ours", run_ours), ("hf", run_hf)):
                        t0 = time.perf_counter()
                        fn(prompts[:b], k)
                        times[(who, b, k)].append(time.perf_counter() - t0)
    out = {"greedy_tokens_match": same, "prompt_tokens": p, "new_tokens": n, "other_cpu_share": load["share"]}
    for b in args.batch_sizes:
        for who in ("ours", "hf"):
            dt = statistics.median(times[(who, b, n)]) - statistics.median(times[(who, b, 1)])
            out[f"{who}_decode_tokens_per_s_batch{b}"] = b * (n - 1) / dt
        out[f"ours_vs_hf_batch{b}"] = out[f"ours_decode_tokens_per_s_batch{b}"] / out[f"hf_decode_tokens_per_s_batch{b}"]
    return out


# ----------------------------------------------------------------------------- kernels


def cpu_info() -> dict:
    """lscpu's model name and the SIMD flags that decide which int8 kernels are fast."""
    info = {"model_name": platform.processor() or platform.machine(), "flags": []}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            info["model_name"] = value.strip()
        elif key.strip() == "Flags":
            wanted = ("avx2", "fma", "f16c", "avx512", "vnni", "amx")
            info["flags"] = sorted(f for f in value.split() if f.startswith(wanted) or "vnni" in f)
    return info


def _timed(fn, calls: list[tuple]) -> float:
    """Mean µs per call over one pass through `calls` (one call per copy of the weights)."""
    t0 = time.perf_counter()
    for args in calls:
        fn(*args)
    return (time.perf_counter() - t0) / len(calls) * 1e6


@torch.no_grad()
def kernel_bench(rounds: int, batch: int = 1, quiet_wait: float = 0.0) -> dict:
    """µs per call of each kernel on each KERNEL_SHAPES layer (see the module docstring)."""
    ao = torchao_api()
    torch.manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for k_in, n_out in KERNEL_SHAPES:
        copies = 3 if n_out > 10_000 else max(3, int(96e6 // (k_in * n_out)))
        x = torch.randn(batch, k_in)
        fp = [nn.Linear(k_in, n_out, bias=False) for _ in range(copies)]
        for lin in fp:
            nn.init.normal_(lin.weight, std=0.02)
        dyn, wo = nn.ModuleList(nn.Linear(k_in, n_out, bias=False) for _ in range(copies)), None
        for a, b in zip(dyn, fp):
            a.weight.data.copy_(b.weight.data)
        ao["quantize_"](dyn, ao["Dynamic"](set_inductor_config=False))
        wo = nn.ModuleList(nn.Linear(k_in, n_out, bias=False) for _ in range(copies))
        for a, b in zip(wo, fp):
            a.weight.data.copy_(b.weight.data)
        ao["quantize_"](wo, ao["WeightOnly"](set_inductor_config=False))
        kernels = {
            "fp32 F.linear": (lambda x, w: F.linear(x, w), [(x, lin.weight) for lin in fp]),
            "bf16 F.linear": (lambda x, w: F.linear(x, w), [(x.bfloat16(), lin.weight.bfloat16()) for lin in fp]),
            "torchao int8_dynamic": (lambda x, m: m(x), [(x, m) for m in dyn]),
            "torchao int8_weight_only": (lambda x, m: m(x), [(x, m) for m in wo]),
            "torch._weight_int8pack_mm": (
                torch._weight_int8pack_mm, [(x, m.weight.qdata, m.weight.scale.reshape(-1)) for m in wo]
            ),
        }
        if fbgemm_available():
            fb = [Int8DynamicLinearCPU(m.weight, None, keep_weight=False) for m in dyn]
            kernels["fbgemm (Int8DynamicLinearCPU)"] = (lambda x, m: m(x), [(x, m) for m in fb])
        times: dict[str, list[float]] = {k: [] for k in kernels}
        for fn, calls in kernels.values():
            fn(*calls[0])  # warm-up
        if quiet_wait:
            wait_quiet(quiet_wait)
        with other_load() as load:
            for _ in range(rounds):
                for name, (fn, calls) in kernels.items():
                    times[name].append(_timed(fn, calls))
        shape = f"{k_in}x{n_out}"
        out[shape] = {k: statistics.median(v) for k, v in times.items()}
        out[shape]["other_cpu_share"] = load["share"]
        log(
            f"  {shape:<10} (x{copies}) " + " | ".join(f"{k} {v:,.0f}" for k, v in out[shape].items() if k in kernels)
            + f" | other processes {load['share']:.0%} of the CPUs"
        )
    return out


def kernel_table(res: dict) -> str:
    shapes = list(res)
    names = [n for n in res[shapes[0]] if n != "other_cpu_share"]
    lines = ["µs per call at batch 1 (median), weights from DRAM; in brackets: fp32 / this (speed-up)",
             f"{'kernel':<30}" + "".join(f"{s:>20}" for s in shapes)]
    for n in names:
        cells = "".join(f"{res[s][n]:>11,.0f} ({res[s]['fp32 F.linear'] / res[s][n]:5.2f}x)" for s in shapes)
        lines.append(f"{n:<30}{cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- variants


def build_variants(name: str, ckpt: Path, work: Path, labels: list[str], cfg=None) -> dict[str, dict]:
    """Checkpoint dir (and validation loss when cfg names data) of every variant; `labels`
    name the int8 ones (INT8_VARIANTS)."""
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
    saved: dict[tuple[str, bool], Path] = {}
    for label in labels:
        method, lm_head, kernel = INT8_VARIANTS[label]
        model = load_consolidated(ckpt).eval()
        t0 = time.perf_counter()
        layers = quantize_model(model, method, lm_head=lm_head, calib_batches=calib, kernel=kernel)
        entry = {
            "quantize_s": time.perf_counter() - t0, "quantized_layers": len(layers), "dtype": None,
            "method": method, "lm_head": lm_head, "kernel": kernel,
        }
        if loader is not None:
            entry["val_loss"] = eval_loss(model, loader, cfg.eval.val_batches, torch.device("cpu"))["loss"]
        if (method, lm_head) not in saved:  # the kernel does not change the file
            saved[(method, lm_head)] = save_quantized(model, layers, work / f"{name}_{method}_{lm_head}", method)
        entry["dir"] = saved[(method, lm_head)]
        variants[label] = entry
    for v in variants.values():
        v["file_bytes"] = checkpoint_bytes(v["dir"])
    return variants


def measure_variants(variants: dict[str, dict], args, rounds: int) -> None:
    opts = {
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch_sizes": args.batch_sizes,
        "repeats": args.repeats, "threads": args.threads,
    }
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(rounds):
        for name, v in variants.items():
            if args.quiet_wait:
                wait_quiet(args.quiet_wait)
            with other_load() as load:
                m = measure_in_subprocess(
                    v["dir"], torch.device("cpu"), dict(opts, dtype=v["dtype"], int8_kernel=v.get("kernel", "auto"))
                )
            m["other_cpu_share"] = load["share"]
            runs[name].append(m)
            log(
                f"  round {r + 1} {name:<21} prefill {m['prefill_ms_batch1']:8.1f} ms | decode tok/s "
                + " ".join(f"b{b}: {t:7.1f}" for b, t in m["decode_tokens_per_s"].items())
                + f" | peak RSS {m['peak_rss_bytes'] / 2**20:7.1f} MiB | other processes {load['share']:.0%}"
            )
    for name, v in variants.items():
        ms = runs[name]
        v["prefill_ms_batch1"] = statistics.median(m["prefill_ms_batch1"] for m in ms)
        v["decode_tokens_per_s"] = {b: statistics.median(m["decode_tokens_per_s"][b] for m in ms) for b in ms[0]["decode_tokens_per_s"]}
        v["peak_rss_bytes"] = statistics.median(m["peak_rss_bytes"] for m in ms)
        v["peak_rss_above_baseline_bytes"] = statistics.median(m["peak_rss_above_baseline_bytes"] for m in ms)
        v["prompt_tokens"], v["new_tokens"] = ms[0]["prompt_tokens"], ms[0]["new_tokens"]
        v["int8_kernels"] = ms[0].get("int8_kernels")
        v["rounds"] = ms


def table(title: str, variants: dict[str, dict]) -> str:
    fp = variants["fp32"]
    lines = [
        title,
        (
            f"{'variant':<21} {'file MiB':>9} {'size':>6} {'val loss':>9} {'delta':>8} {'prefill ms':>10} "
            f"{'dec b1':>8} {'x fp32':>7} {'dec b8':>8} {'x fp32':>7} {'peak RSS MiB':>12} {'above base':>10}"
        ),
    ]
    for name, v in variants.items():
        loss = v.get("val_loss")
        delta = f"{(loss - fp['val_loss']) / fp['val_loss']:+.2%}" if loss is not None else "-"
        d = v["decode_tokens_per_s"]
        lines.append(
            f"{name:<21} {v['file_bytes'] / 2**20:9.2f} {v['file_bytes'] / fp['file_bytes']:6.1%} "
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
    p.add_argument("--kernel-rounds", type=int, default=5, help="interleaved rounds of the kernel timings")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every timing (default: torch's, one per core)")
    p.add_argument(
        "--quiet-wait", type=float, default=0.0,
        help="before each timing, wait up to this many seconds for the CPUs to be idle (shared machines)",
    )
    p.add_argument("--kernels-only", action="store_true", help="time the kernels only (no models)")
    p.add_argument(
        "--variants", nargs="+", default=list(INT8_VARIANTS), choices=list(INT8_VARIANTS),
        help="int8 variants to build and time (fp32 and bf16 always run; int8_static on the trained model only)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    if 1 not in args.batch_sizes or 8 not in args.batch_sizes:
        p.error("--batch-sizes must include 1 and 8 (the table compares them)")

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    result: dict = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "cpu": cpu_info(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "torchao": torchao_api()["version"], "fbgemm": fbgemm_available(),
        },
    }
    log(f"CPU: {result['machine']['cpu']['model_name']} | flags {' '.join(result['machine']['cpu']['flags'])}")
    log("kernels (one Linear layer, batch 1) ...")
    result["kernels_batch1_us"] = kernel_bench(args.kernel_rounds, quiet_wait=args.quiet_wait)
    if args.kernels_only:
        print()
        print(kernel_table(result["kernels_batch1_us"]))
        if args.out:
            write_results(args.out, result)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, cfg = trained_checkpoint(args, work)
        log("trained model: building variants ...")
        trained = build_variants("trained", ckpt, work, args.variants, cfg)
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
            gvars = build_variants("gpt2", big_dir, work, [v for v in args.variants if v != "int8_static"])
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
    print(kernel_table(result["kernels_batch1_us"]))
    print()
    print(table("trained (quickstart shape)" if not args.checkpoint else f"trained ({args.checkpoint})", result["trained"]["variants"]))
    print(f"ours vs transformers (fp32): {json.dumps(result['trained']['ours_vs_hf'])}")
    if "gpt2_124m_random" in result:
        print()
        print(table("gpt2-124M shape, random weights (loss not meaningful)", result["gpt2_124m_random"]["variants"]))
        print(f"ours vs transformers (fp32): {json.dumps(result['gpt2_124m_random']['ours_vs_hf'])}")
    print(f"\nwall time {result['wall_time_s']:.0f}s")
    if args.out:
        write_results(args.out, result)


if __name__ == "__main__":
    main()
