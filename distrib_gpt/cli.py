"""`distrib-gpt` command line: one subcommand per stage of the pipeline.

    distrib-gpt prepare --config CFG [overrides]   tokenize data into shards (reused by train)
    distrib-gpt train   --config CFG [overrides]   fine-tune and write the run directory
    distrib-gpt quantize --checkpoint DIR --out DIR   int8 checkpoint + quant_summary.json
    distrib-gpt eval     --checkpoint DIR             validation loss / perplexity (fp or int8)
    distrib-gpt generate --checkpoint DIR --prompt T  sample text (fp or int8, KV cache)
    distrib-gpt export-hf --checkpoint DIR --out DIR   Hugging Face GPT-2 directory
    distrib-gpt plan --model M --gpus G --gpu NAME ...  per-GPU memory, fit, step/epoch time
    distrib-gpt sweep --config CFG --grid KEY=V1,V2 ... one run per grid cell, resumable
    distrib-gpt report RUN_DIR... --out DIR            report.md + plots comparing runs

Expected failures (bad config, bad data, impossible precision, bad checkpoint, diverged
training) print one line, `error: ...`, and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

EXIT_USAGE = 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .generate import GenerationError
    from .plan import PlanError
    from .precision import PrecisionError
    from .quantize import QuantizationError
    from .report import ReportError
    from .sweep import SweepError
    from .train import TrainingError

    return (
        ConfigError, DataError, PrecisionError, CheckpointError, TrainingError, FileNotFoundError,
        QuantizationError, GenerationError, PlanError, SweepError, ReportError,
    )


def run_command(fn: Callable[[], object]) -> int:
    """Run `fn`, turning expected failures into a one-line message and exit status 2."""
    try:
        fn()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        _record_for_torchrun(e)
        return EXIT_USAGE
    except Exception as e:
        _record_for_torchrun(e)
        raise
    return 0


def _record_for_torchrun(e: BaseException) -> None:
    """Under torchrun, write the error where the agent looks for it, so the job's failure
    report names this rank and shows its message instead of a bare exit code."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)


def _prepare(args: argparse.Namespace) -> None:
    from .config import load_config
    from .data import prepare_data

    cfg = load_config(args.config, args.overrides)
    prepared = prepare_data(cfg.data)  # logs what it wrote, with counts, or that it reused
    if prepared.reused:
        for split, c in prepared.manifest.get("counts", {}).items():
            print(f"  {split}: " + ", ".join(f"{k}={v}" for k, v in c.items()))


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train import train

    train(load_config(args.config, args.overrides))


def _export_hf(args: argparse.Namespace) -> None:
    from .checkpoint import export_hf, load_any

    out = export_hf(load_any(args.checkpoint), args.out)
    print(f"wrote {out} (load it with transformers.GPT2LMHeadModel.from_pretrained)")


def _quantize(args: argparse.Namespace) -> None:
    from .quantize import quantize_command

    quantize_command(
        args.checkpoint, args.out, args.config, args.overrides, method=args.method, device=args.device,
        summary=args.summary, overwrite=args.overwrite, measure=False if args.no_measure else None,
    )


def _eval(args: argparse.Namespace) -> None:
    from .quantize import eval_command

    eval_command(args.checkpoint, args.config, args.overrides, device=args.device, as_json=args.json)


def _generate(args: argparse.Namespace) -> None:
    from .generate import generate_command

    generate_command(args)


def _add_inference_commands(sub) -> None:
    """quantize / eval / generate (int8 inference; see docs/inference.md)."""
    config_help = "YAML config whose data.* names the validation data (default: the run's config.yaml next to the checkpoint)"
    p = sub.add_parser(
        "quantize",
        help="quantize a checkpoint to int8 with torchao; writes quant_summary.json",
        description="Quantize a consolidated checkpoint to int8 with torchao, save it (safetensors, no pickle), "
        "compare its validation loss with fp32 (fails when over quantize.gate_rel_loss), and time both. "
        "Methods: int8_dynamic (default; int8 weights per output channel, activations quantized per token on "
        "the fly), int8_weight_only, int8_static (one activation scale per layer calibrated on "
        "quantize.calib_examples training examples; torchao supports it on CPU, verified there; not verified "
        "on CUDA). Layers kept in floating point: quantize.lm_head=false, quantize.skip=[patterns]. On an x86 "
        "CPU, int8_dynamic runs on fbgemm's int8 kernel; int8_weight_only and int8_static run on torchao's, which "
        "is slower than fp32 without AVX-512 VNNI/AMX (measured figures: docs/benchmarks.md).",
    )
    p.add_argument("--checkpoint", required=True, help="consolidated checkpoint directory or run directory (e.g. runs/NAME)")
    p.add_argument("--out", required=True, help="directory for the int8 checkpoint")
    p.add_argument("--method", choices=["int8_dynamic", "int8_weight_only", "int8_static"], help="quantize.method (default int8_dynamic)")
    p.add_argument("--config", "-c", help=config_help)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="quantize.device (default cpu)")
    p.add_argument("--summary", help="where to write quant_summary.json (default: OUT/quant_summary.json)")
    p.add_argument("--no-measure", action="store_true", help="skip the timing and memory figures (quantize.measure=false)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides (quantize.*, data.*, eval.*)")
    p.set_defaults(fn=_quantize)

    p = sub.add_parser(
        "eval",
        help="validation loss and perplexity of a checkpoint (fp or int8)",
        description="Mean token loss and perplexity of a checkpoint (fp or int8) on the validation split "
        "(eval.val_batches batches of eval.batch_size), as training reports it.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (fp or int8) or run directory")
    p.add_argument("--config", "-c", help=config_help)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="default: cpu")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides (data.*, eval.*)")
    p.set_defaults(fn=_eval)

    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint (fp or int8) with a KV cache",
        description="Continue a prompt with a checkpoint (fp or int8). --prompt is used verbatim; --instruction "
        "(and --context) fill the instruction template the model was trained with (data.template of the run's "
        "config.yaml, else Dolly's). A prompt of P tokens needs P + max-new-tokens <= the model's positions: "
        "otherwise it is refused, or with --overlong truncate cut to its last tokens. Stops at end-of-text.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (fp or int8) or run directory")
    p.add_argument("--prompt", help="raw text to continue")
    p.add_argument("--instruction", help="instruction for the training template")
    p.add_argument("--context", help="optional context (input) for the template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; default: 0.8")
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens; default: 50")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; default: 1.0 (off)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed; default: 1337")
    p.add_argument("--overlong", choices=["error", "truncate"], default="error", help="prompt too long: refuse (default) or keep its last tokens")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="default: cpu")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow; for checking)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    p.add_argument("--config", "-c", help="config whose data.template to use (default: the run's config.yaml, else Dolly)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides (data.template ...)")
    p.set_defaults(fn=_generate)


# ----------------------------------------------------------------------------- plan


def _plan(args: argparse.Namespace) -> None:
    from .plan import plan_command

    plan_command(args)


def _add_plan_command(sub) -> None:
    """`distrib-gpt plan`: memory / compute planner (distrib_gpt/plan.py, docs/planning.md).
    Names are checked by the planner, not by argparse choices, so that a bad one fails in one
    line listing the known ones."""
    from . import plan
    from .metrics import GPU_SPECS
    from .model import GPT_SHAPES

    p = sub.add_parser(
        "plan",
        help="per-GPU memory, whether it fits, FLOPs, step and epoch time of a run",
        description="Estimate, per GPU, the parameter, gradient, optimizer-state and activation memory of a "
        "training run of this code, whether it fits the GPU, FLOPs per token, step time and time per epoch at an "
        "assumed MFU, and the Chinchilla token count. Every formula and its source: distrib_gpt/plan.py and "
        "docs/planning.md. Without --config: a GPT-2 model on Dolly-15k (estimated token count).",
        epilog="example: distrib-gpt plan --model gpt2-xl --gpus 8 --gpu a100-40gb --strategy fsdp_full "
        "--precision bf16 --micro-batch 4 --seq 1024",
    )
    p.add_argument("--model", help=f"GPT-2 shape: {', '.join(GPT_SHAPES)} (default gpt2; overrides --config's model)")
    p.add_argument("--config", "-c", help="take model, precision, strategy, micro-batch, seq, grad-accum, epochs and "
                   "activation checkpointing from a run config (flags given here override it); dataset tokens from "
                   "its prepared shards when they exist")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides (with --config)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs in the job (default 1)")
    p.add_argument("--gpu", default="a100-40gb", help=f"GPU type: {', '.join(GPU_SPECS)} (default a100-40gb)")
    p.add_argument("--strategy", help=f"{', '.join(plan.STRATEGIES)} (default single for 1 GPU, else ddp)")
    p.add_argument("--precision", help="fp32, tf32, fp16, bf16 or auto (default auto: bf16 where the GPU has it, "
                   "else fp16; the T4 and V100 have no bf16/TF32)")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU per forward (default 8)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 1024)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--gpus-per-node", type=int, help="hsdp's shard group (default min(gpus, 8))")
    p.add_argument("--supervised-fraction", type=float, default=1.0, help="fraction of positions with a target: "
                   "the model runs the LM head only there (default 1.0, the upper bound)")
    p.add_argument("--mfu", type=float, default=plan.DEFAULT_MFU, help=f"model FLOPs utilisation assumed for the step time "
                   f"(default {plan.DEFAULT_MFU}: nanoGPT's GPT-2 124M reproduction on 8 A100s implies 23-29%%)")
    p.add_argument("--dataset-tokens", type=int, help="tokens per epoch (default: the --config's prepared shards, "
                   "else a Dolly-15k estimate)")
    p.add_argument("--epochs", type=int, help="epochs for the total time and the Chinchilla comparison (default 3)")
    p.add_argument("--reserve-gib", type=float, default=plan.DEFAULT_RESERVE_GIB, help="GiB of the GPU not available to "
                   f"tensors: driver, CUDA context, cuBLAS, NCCL (default {plan.DEFAULT_RESERVE_GIB})")
    p.add_argument("--fragmentation", type=float, default=plan.DEFAULT_FRAGMENTATION, help="caching-allocator overhead "
                   f"as a fraction of the planned total (default {plan.DEFAULT_FRAGMENTATION})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes, FLOPs, seconds)")
    p.set_defaults(fn=_plan)


# ------------------------------------------------------------------- sweep and report


def _sweep(args: argparse.Namespace) -> None:
    from .sweep import sweep_command

    sweep_command(args)


def _report(args: argparse.Namespace) -> None:
    from .report import report_command

    report_command(args)


def _add_report_commands(sub) -> None:
    """`distrib-gpt sweep` (distrib_gpt/sweep.py) and `distrib-gpt report` (distrib_gpt/report.py);
    see docs/report.md."""
    p = sub.add_parser(
        "sweep",
        help="run one training run per cell of a grid of config values, resumably",
        description="Run the cartesian product of --grid axes, one run per cell, one after another, each in its "
        "own process (under torchrun with --nproc-per-node). Every cell's config is validated before anything "
        "runs. Runs go to <run.out_dir>/<name>/<run.name>-<key>=<value>..., with sweep.json recording each "
        "cell's command, status and exit code. Running the same command again skips finished cells and resumes "
        "started ones (resume=auto).",
        epilog="example: distrib-gpt sweep --config configs/quickstart.yaml --grid precision=fp32,bf16 "
        "--grid lora.enabled=false,true",
    )
    p.add_argument("--config", "-c", help="YAML config every cell starts from")
    p.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=V1,V2",
                   help="an axis: a dotted config key and its values (parsed as YAML like overrides); repeat for more axes")
    p.add_argument("--name", help="sweep name: the runs go to <run.out_dir>/<name>/ (default <run.name>-sweep)")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="run each cell under python -m torch.distributed.run --standalone --nproc-per-node N")
    p.add_argument("--keep-going", action="store_true", help="run the remaining cells after a cell fails")
    p.add_argument("--dry-run", action="store_true", help="validate every cell and print its action and command; run nothing")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides for every cell")
    p.set_defaults(fn=_sweep)

    p = sub.add_parser(
        "report",
        help="compare run directories: report.md with tables and PNG plots",
        description="Read run directories (summary.json, config.yaml, metrics.jsonl, quant_summary.json) or sweep "
        "directories (sweep.json) and write report.md, report.json (the exact values in every table) and PNG "
        "plots into --out: results per run, ratios against the fp32 run, loss curves, throughput and memory "
        "charts, the ablation grid, int8 results and a method section. Runs of different data or model are "
        "refused unless --allow-mixed, which reports them flagged.",
        epilog="example: distrib-gpt report runs/quickstart-sweep --out reports/quickstart",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or sweep directories (their cells' runs)")
    p.add_argument("--out", required=True, help="report directory (replaced if it holds an earlier report)")
    p.add_argument("--allow-mixed", action="store_true", help="report runs of different data or model, flagged, instead of refusing")
    p.add_argument("--title", help="report title (default: from the runs' names)")
    p.set_defaults(fn=_report)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="distrib-gpt",
        description="Distributed, mixed-precision fine-tuning of GPT-2 on instruction data.",
        epilog="Overrides are dotted config keys, e.g. optim.lr=3e-4 train.epochs=3 precision=bf16, "
        "anywhere on the line; for a key given twice the later value wins.",
    )
    parser.add_argument("--version", action="version", version=f"distrib-gpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn, help_ in (
        ("prepare", _prepare, "tokenize the configured data into shards with a manifest"),
        ("train", _train, "train (fine-tune) a model and write a run directory"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", "-c", help="YAML config (see configs/); defaults when omitted")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
        p.set_defaults(fn=fn)
    p = sub.add_parser(
        "export-hf",
        help="write a checkpoint as a Hugging Face GPT-2 directory",
        description="Write a consolidated or sharded checkpoint (or a run directory's) as a directory that "
        "transformers.GPT2LMHeadModel.from_pretrained loads.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, sharded checkpoint, or run directory")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.set_defaults(fn=_export_hf)
    _add_inference_commands(sub)
    _add_plan_command(sub)
    _add_report_commands(sub)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line parsed, with dotted overrides accepted anywhere on it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a nargs="*" positional from its first run of words only, so in
    # `train a=1 --config X b=2` the b=2 comes back unparsed: later runs follow earlier
    # ones, so a later value of a key wins, as everywhere else on the line
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if getattr(args, "checkpoint", None):  # one resolver: a run directory names its checkpoint/
        from .checkpoint import consolidated_dir

        args.checkpoint = str(consolidated_dir(args.checkpoint))
    return run_command(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
