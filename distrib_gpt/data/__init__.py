"""The data pipeline, one way: sources -> templates -> tokenize -> shards + manifest -> batches.

    from distrib_gpt.data import prepare_data, TokenizedSplit, BatchLoader
    prepared = prepare_data(cfg.data)                      # tokenize once (or reuse)
    train = TokenizedSplit.open(prepared.dir, "train")     # memory-mapped
    loader = BatchLoader(train, cfg.data.batching, cfg.data.seq_len, batch_size, seed,
                         rank=rank, world_size=world_size)

See docs/data.md.
"""

from distrib_gpt.data.loader import Batch, BatchLoader, TokenizedSplit
from distrib_gpt.data.prepare import Prepared, prepare_data
from distrib_gpt.data.sources import DataError, SourceInfo, load_records
from distrib_gpt.data.templates import format_prompt

__all__ = [
    "Batch",
    "BatchLoader",
    "DataError",
    "Prepared",
    "SourceInfo",
    "TokenizedSplit",
    "format_prompt",
    "load_records",
    "prepare_data",
]
