"""`distrib-gpt` command line: one subcommand per stage of the pipeline.

    distrib-gpt prepare --config CFG [overrides]   tokenize data into shards (reused by train)
    distrib-gpt train   --config CFG [overrides]   fine-tune and write the run directory
    distrib-gpt quantize --checkpoint DIR --out DIR   int8 checkpoint + quant_summary.json
    distrib-gpt eval     --checkpoint DIR             validation loss / perplexity (fp or int8)
    distrib-gpt generate --checkpoint DIR --prompt T  sample text (fp or int8, KV cache)
    distrib-gpt export-hf --checkpoint DIR --out DIR   Hugging Face GPT-2 directory

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
    from .precision import PrecisionError
    from .quantize import QuantizationError
    from .train import TrainingError

    return (
        ConfigError, DataError, PrecisionError, CheckpointError, TrainingError, FileNotFoundError,
        QuantizationError, GenerationError,
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
        "on CUDA). Layers kept in floating point: quantize.lm_head=false, quantize.skip=[patterns]. On CPUs "
        "without AVX-512 VNNI/AMX int8 is smaller but slower than fp32 (docs/inference.md).",
    )
    p.add_argument("--checkpoint", required=True, help="consolidated checkpoint directory (e.g. runs/NAME/checkpoint)")
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
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (fp or int8)")
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
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (fp or int8)")
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="distrib-gpt",
        description="Distributed, mixed-precision fine-tuning of GPT-2 on instruction data.",
        epilog="Overrides are dotted config keys, e.g. optim.lr=3e-4 train.epochs=3 precision=bf16.",
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
