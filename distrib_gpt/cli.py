"""`distrib-gpt` command line: one subcommand per stage of the pipeline.

    distrib-gpt prepare --config CFG [overrides]   tokenize data into shards (reused by train)
    distrib-gpt train   --config CFG [overrides]   fine-tune and write the run directory

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
    from .precision import PrecisionError
    from .train import TrainingError

    return (ConfigError, DataError, PrecisionError, CheckpointError, TrainingError, FileNotFoundError)


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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
