"""Tokenize a source once into memory-mappable shards plus a manifest, and reuse them.

    cache_dir/<key>/
        manifest.json
        train-00000.tokens.npy   uint16  token ids of all examples, back to back
        train-00000.mask.npy     uint8   1 where the token is a supervised target
        train-00000.offsets.npy  int64   example boundaries (n_examples + 1, from 0)
        val-00000.*.npy          the same for the validation split

`key` hashes everything that changes the tokens (the source's content hash, the tokenizer's
BPE files, format/columns/template, masking, seq_len, overlong policy, split, max_examples
and FORMAT_VERSION). Same key -> the shards are reused without tokenizing; any change ->
a new directory. Shards are plain .npy files so `np.load(mmap_mode="r")` maps them without
reading them into memory.

Per example: tokens = prompt + response + [EOT]. mask[i] == 1 means token i is a target the
model is trained to predict from the tokens before it: the response tokens and the EOT
(with `train_on_prompt`, the prompt tokens too). Token 0 of an example is never a target:
nothing of its own example precedes it, and leaving it out makes `pack` and `pad` batching
supervise exactly the same tokens. Plain text: text + [EOT], every token but the first.

The build happens in a temporary sibling directory that is renamed into place only when
complete, so an interrupted prepare never leaves a half-written <key> directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from distrib_gpt.config import DataConfig
from distrib_gpt.data.sources import DataError, SourceInfo, is_text_format, load_records, resolve_source
from distrib_gpt.data.templates import format_prompt, prompt_templates
from distrib_gpt.tokenizer import EOT_ID, VOCAB_SIZE, gpt2_encoding, ranks_sha256

FORMAT_VERSION = 1
"""Bump when the shard layout or the tokenization rules change: it is part of the key."""

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
_ENCODE_BATCH = 2048  # records per encode_ordinary_batch call (bounds peak memory of the lists)


@dataclass
class Prepared:
    dir: Path
    """cache_dir/<key>: open splits with `TokenizedSplit.open(dir, "train" | "val")`."""
    manifest: dict[str, Any]
    reused: bool
    """True when existing shards were reused without tokenizing."""


@dataclass
class _Example:
    tokens: list[int]
    sup_start: int  # first target position; mask[i] = 1 for i >= sup_start


# ------------------------------------------------------------------------------ key


def processing_settings(cfg: DataConfig) -> dict[str, Any]:
    """Every setting that changes the tokens (and so belongs in the cache key)."""
    custom = cfg.template == "custom"
    return {
        "format": cfg.format,
        "columns": dict(sorted(cfg.columns.items())),
        "template": cfg.template,
        # Template strings only matter for `custom`; leaving them out otherwise avoids
        # needless cache misses when a config merely carries an unused value.
        "prompt_template": cfg.prompt_template if custom else None,
        "prompt_template_no_context": cfg.prompt_template_no_context if custom else None,
        "train_on_prompt": cfg.train_on_prompt,
        "seq_len": cfg.seq_len,
        "overlong": cfg.overlong,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "max_examples": cfg.max_examples,
    }


def cache_key(cfg: DataConfig, source_sha256: str, tokenizer_sha256: str) -> str:
    blob = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "source_sha256": source_sha256,
            "tokenizer_sha256": tokenizer_sha256,
            "settings": processing_settings(cfg),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ tokenize


def _tokenize_records(records: list[dict[str, str]], cfg: DataConfig) -> list[_Example]:
    """Records -> token lists with the start of supervision; prompt and response are
    encoded separately so the prompt/response boundary is exact."""
    enc = gpt2_encoding()
    out: list[_Example] = []
    for start in range(0, len(records), _ENCODE_BATCH):
        chunk = records[start : start + _ENCODE_BATCH]
        # encode_ordinary: a literal "<|endoftext|>" in the data is plain text, never EOT.
        if is_text_format(cfg):
            for toks in enc.encode_ordinary_batch([r["text"] for r in chunk]):
                out.append(_Example(toks + [EOT_ID], 1))
            continue
        prompts = enc.encode_ordinary_batch([format_prompt(r["instruction"], r["context"], cfg) for r in chunk])
        responses = enc.encode_ordinary_batch([r["response"] for r in chunk])
        for p, r in zip(prompts, responses):
            out.append(_Example(p + r + [EOT_ID], 1 if cfg.train_on_prompt else max(len(p), 1)))
    return out


def _apply_overlong(ex: _Example, cfg: DataConfig) -> tuple[_Example | None, str]:
    """(example or None, what happened: "ok" | "truncated" | "dropped")."""
    limit = cfg.seq_len + 1  # x = tokens[:-1], y = tokens[1:] fill exactly one block
    if len(ex.tokens) <= limit:
        return ex, "ok"
    if cfg.overlong == "drop":
        return None, "dropped"
    if ex.sup_start >= limit:  # the cut would leave no supervised token
        return None, "dropped"
    return _Example(ex.tokens[:limit], ex.sup_start), "truncated"


def split_indices(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Deterministic train/val assignment of record indices 0..n-1 (each sorted).

    Done on records, before overlong dropping, so a record's split does not change with
    seq_len or the overlong policy.
    """
    n_val = max(1, int(round(n * val_fraction)))
    if n < 2 or n_val >= n:
        raise DataError(
            f"{n} record(s) cannot make a train and a validation split with val_fraction={val_fraction} "
            "(each needs at least 1 example)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}


# ------------------------------------------------------------------------------ write


def _write_split(out_dir: Path, split: str, examples: list[_Example], shard_tokens: int) -> list[dict[str, Any]]:
    """Write one split as shards of at most shard_tokens tokens (an example is never split
    across shards, so a single example longer than shard_tokens gets a shard of its own)."""
    shards: list[dict[str, Any]] = []
    i = 0
    while i < len(examples):
        j, n_tok = i, 0
        while j < len(examples) and (j == i or n_tok + len(examples[j].tokens) <= shard_tokens):
            n_tok += len(examples[j].tokens)
            j += 1
        group = examples[i:j]
        lengths = np.fromiter((len(e.tokens) for e in group), dtype=np.int64, count=len(group))
        offsets = np.zeros(len(group) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter(itertools.chain.from_iterable(e.tokens for e in group), dtype=np.uint16, count=n_tok)
        # mask by index arithmetic: position within its example >= that example's sup_start
        pos = np.arange(n_tok, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        sup_start = np.fromiter((e.sup_start for e in group), dtype=np.int64, count=len(group))
        mask = (pos >= np.repeat(sup_start, lengths)).astype(np.uint8)

        stem = f"{split}-{len(shards):05d}"
        names = {"tokens": f"{stem}.tokens.npy", "mask": f"{stem}.mask.npy", "offsets": f"{stem}.offsets.npy"}
        np.save(out_dir / names["tokens"], tokens)
        np.save(out_dir / names["mask"], mask)
        np.save(out_dir / names["offsets"], offsets)
        shards.append({**names, "examples": len(group), "n_tokens": n_tok, "supervised_tokens": int(mask.sum())})
        i = j
    return shards


def _versions() -> dict[str, str]:
    import tiktoken

    out = {"python": platform.python_version(), "numpy": np.__version__, "tiktoken": tiktoken.__version__}
    for mod in ("pyarrow", "datasets"):
        if mod in sys.modules:  # only what this run actually used
            out[mod] = getattr(sys.modules[mod], "__version__", "unknown")
    return out


def _manifest_ok(d: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete <key> directory, else None."""
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("format_version") != FORMAT_VERSION:
        return None
    splits = manifest.get("splits", {})
    for split in SPLITS:
        if split not in splits:
            return None
        for shard in splits[split]["shards"]:
            if not all((d / shard[k]).is_file() for k in ("tokens", "mask", "offsets")):
                return None
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process / not a valid pid
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def clean_stale_tmp(cache_dir: Path, log: Callable[[str], None] = print) -> None:
    """Remove `.tmp-<key>-<pid>` directories left by killed prepares. A directory whose pid
    is still running (another process preparing right now, e.g. another rank on this host)
    is left alone."""
    if not cache_dir.is_dir():
        return
    for d in cache_dir.iterdir():
        if not d.name.startswith(TMP_PREFIX) or not d.is_dir():
            continue
        pid_str = d.name.rsplit("-", 1)[-1]
        pid = int(pid_str) if pid_str.isdigit() else -1
        if pid != os.getpid() and pid > 0 and _pid_alive(pid):
            continue
        log(f"data: removing stale temporary directory {d}")
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------ entry point


def prepare_data(cfg: DataConfig, log: Callable[[str], None] = print) -> Prepared:
    """Tokenize `cfg.source` into cache_dir/<key>/ (or reuse it) and return where it is."""
    cache_dir = Path(cfg.cache_dir)
    clean_stale_tmp(cache_dir, log)
    if cfg.template != "none" and not is_text_format(cfg):
        prompt_templates(cfg)  # a broken custom template fails here, before any work

    info = resolve_source(cfg)
    tokenizer_sha = ranks_sha256()
    key = cache_key(cfg, info.sha256, tokenizer_sha)
    final = cache_dir / key

    if final.exists():
        # A <key> directory only ever appears complete (renamed into place after its
        # manifest was written), so one that fails this check was damaged afterwards.
        manifest = _manifest_ok(final, key)
        if manifest is not None:
            log(f"data: reusing prepared shards in {final} (manifest key {key} matches)")
            return Prepared(final, manifest, reused=True)
        log(f"data: {final} is damaged (manifest or shard files missing); rebuilding")
        shutil.rmtree(final)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{TMP_PREFIX}{key}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest = _build(cfg, info, key, tokenizer_sha, tmp, log)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same key first (rename onto a non-empty dir).
            manifest = _manifest_ok(final, key)
            if manifest is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"data: another process prepared {final} first; using it")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"data: wrote {final}")
    return Prepared(final, manifest, reused=False)


def _build(cfg: DataConfig, info: SourceInfo, key: str, tokenizer_sha: str, out: Path, log) -> dict[str, Any]:
    t0 = time.perf_counter()
    records, info = load_records(cfg, info)
    log(
        f"data: {info.records} records from {info.description}"
        + (f" ({info.dropped_empty} dropped: empty instruction/response)" if info.dropped_empty else "")
    )
    examples = _tokenize_records(records, cfg)
    assignment = split_indices(len(examples), cfg.val_fraction, cfg.split_seed)

    splits: dict[str, Any] = {}
    for split in SPLITS:
        kept: list[_Example] = []
        truncated = dropped = 0
        for idx in assignment[split]:
            ex, what = _apply_overlong(examples[idx], cfg)
            truncated += what == "truncated"
            dropped += what == "dropped"
            if ex is not None:
                kept.append(ex)
        if not kept:
            raise DataError(
                f"{info.location}: the {split} split has no examples left after dropping {dropped} "
                f"longer than seq_len + 1 = {cfg.seq_len + 1} tokens"
            )
        shards = _write_split(out, split, kept, cfg.shard_tokens)
        splits[split] = {
            "examples": len(kept),
            "tokens": sum(s["n_tokens"] for s in shards),
            "supervised_tokens": sum(s["supervised_tokens"] for s in shards),
            "truncated": truncated,
            "dropped_overlong": dropped,
            "shards": shards,
        }
        log(
            f"data: {split}: {len(kept)} examples, {splits[split]['tokens']} tokens "
            f"({splits[split]['supervised_tokens']} supervised), {truncated} truncated, "
            f"{dropped} dropped as overlong, {len(shards)} shard(s)"
        )

    manifest = {
        "key": key,
        "format_version": FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {
            "description": info.description,
            "kind": info.kind,
            "location": info.location,
            "sha256": info.sha256,
            "rows": info.rows,
            "dropped_empty": info.dropped_empty,
            "records": info.records,
        },
        "tokenizer": {"name": "gpt2", "n_vocab": VOCAB_SIZE, "eot_id": EOT_ID, "ranks_sha256": tokenizer_sha},
        "settings": {**processing_settings(cfg), "hub_split": cfg.hub_split, "shard_tokens": cfg.shard_tokens},
        "splits": splits,
        # The same numbers without the shard lists, for logs and run summaries.
        "counts": {
            **{split: {k: v for k, v in d.items() if k != "shards"} for split, d in splits.items()},
            "source": {"rows": info.rows, "dropped_empty": info.dropped_empty, "records": info.records},
        },
        "versions": _versions(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    # Written last: a directory with a manifest is a complete directory.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
