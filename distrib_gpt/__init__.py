"""distrib_gpt: distributed, mixed-precision fine-tuning of GPT-2 on instruction data."""

__version__ = "0.1.0"

from .model import GPT, GPTConfig  # noqa: E402

__all__ = ["GPT", "GPTConfig", "__version__"]
