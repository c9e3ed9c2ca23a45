"""Read instruction (or plain-text) records from a local file, the bundled sample or the
Hugging Face hub, and validate every one of them before any tokenizing starts.

Every record comes out normalised to `{"instruction", "context", "response"}` strings (or
`{"text"}` for plain text), whatever the schema it was stored in. Anything wrong with the
input raises `DataError` with a one-line message that names the file and the 1-based line
(JSONL), or the 0-based record index (`file[12]`, for JSON arrays, parquet and hub rows),
so that a bad record in a 15k-line file can be found without a debugger.

Decisions worth knowing:
- a null or missing *optional* field (context / input) is read as "";
  a null *required* field (instruction, response, text) is an error like any non-string;
- records whose instruction or response (or text) is empty or only whitespace are not an
  error: they are dropped and counted (`SourceInfo.dropped_empty`);
- the whole source is validated even when `max_examples` keeps only its first N records,
  so a smoke run fails on the same bad record the full run would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from distrib_gpt.config import DataConfig

BUNDLED_SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "dolly_sample.jsonl"
"""The offline Dolly-schema sample (see distrib_gpt/assets/README.md). A path relative to the
package rather than importlib.resources, because pyarrow/json readers want a real file and
the package is always installed unzipped."""

FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}

# Field names of each schema: (our name, stored name, required).
SCHEMAS: dict[str, list[tuple[str, str, bool]]] = {
    "dolly": [("instruction", "instruction", True), ("context", "context", False), ("response", "response", True)],
    "alpaca": [("instruction", "instruction", True), ("context", "input", False), ("response", "output", True)],
    "text": [("text", "text", True)],
}

# owner/name with no file extension, e.g. databricks/databricks-dolly-15k
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_HUB_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".gz", ".zst", ".arrow"}


class DataError(ValueError):
    """A problem with the training data; the one-line message names file and line/record."""


@dataclass(frozen=True)
class SourceInfo:
    """Where the records came from, for the manifest. Counts are filled by load_records."""

    kind: str
    """`jsonl`, `json`, `parquet` or `hub`."""
    location: str
    """The file path as given (or the bundled sample's path), or the hub id."""
    description: str
    sha256: str
    """sha256 of the file's bytes; for a hub dataset its `_fingerprint` (or of id + split)."""
    rows: int = 0
    """Records read from the source."""
    dropped_empty: int = 0
    """Records dropped for an empty instruction/response (or text)."""
    records: int = 0
    """Records returned (after dropping, and after `max_examples`)."""


# ------------------------------------------------------------------------------ fields


def is_text_format(cfg: DataConfig) -> bool:
    """True when records are plain text: `format: text`, or `columns` mapping `text`."""
    return cfg.format == "text" or (cfg.format == "columns" and "text" in cfg.columns)


def schema(cfg: DataConfig) -> list[tuple[str, str, bool]]:
    """(our field, stored field name, required) for the configured format."""
    if cfg.format != "columns":
        return SCHEMAS[cfg.format]
    if "text" in cfg.columns:
        return [("text", cfg.columns["text"], True)]
    out = [("instruction", cfg.columns["instruction"], True)]
    if "context" in cfg.columns:
        out.append(("context", cfg.columns["context"], False))
    out.append(("response", cfg.columns["response"], True))
    return out


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _normalise(obj: Any, fields: list[tuple[str, str, bool]], where: str) -> dict[str, str]:
    """Map one stored object to our field names, checking presence and types."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    rec = {}
    for ours, stored, required in fields:
        if stored not in obj:
            if required:
                raise DataError(f"{where}: missing field '{stored}'")
            rec[ours] = ""
            continue
        value = obj[stored]
        if value is None and not required:
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{stored}' must be a string, got {_type_name(value)}")
        rec[ours] = value
    return rec


def _is_empty(rec: dict[str, str]) -> bool:
    if "text" in rec:
        return not rec["text"].strip()
    return not rec["instruction"].strip() or not rec["response"].strip()


# ------------------------------------------------------------------------------ readers


def _jsonl_objects(path: str, data: bytes) -> Iterator[tuple[str, Any]]:
    """(where, parsed object) per non-blank line; `where` is `path:LINE`."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 ({e.reason} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None


def _json_array_objects(path: str, data: bytes) -> Iterator[tuple[str, Any]]:
    """(where, object) per element of a top-level JSON array; `where` is `path[i]`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(top, list):
        raise DataError(f"{path}: a .json source must be a top-level array of objects, got {_type_name(top)}")
    for i, obj in enumerate(top):
        yield f"{path}[{i}]", obj


def _check_columns(location: str, columns: Iterable[str], fields: list[tuple[str, str, bool]]) -> None:
    """Tabular sources have a schema up front: report a missing column once, by name."""
    columns = list(columns)
    for _, stored, required in fields:
        if required and stored not in columns:
            have = ", ".join(repr(c) for c in columns) or "none"
            raise DataError(f"{location}: missing column '{stored}' (columns: {have})")


def _parquet_objects(path: str, fields: list[tuple[str, str, bool]]) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    _check_columns(path, table.column_names, fields)
    wanted = [stored for _, stored, _ in fields if stored in table.column_names]
    for i, obj in enumerate(table.select(wanted).to_pylist()):
        yield f"{path}[{i}]", obj


@functools.lru_cache(maxsize=4)
def _load_hub(source: str, split: str):
    # Cached: resolve_source and load_records both need the dataset, and each
    # load_dataset call may go to the network to check for updates.
    import datasets  # imported lazily: slow to import and only needed for hub sources

    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # the hub client raises many types; all mean "could not load"
        raise DataError(f"{source}: could not load hub dataset (split '{split}'): {type(e).__name__}: {e}") from None


def _hub_objects(ds, location: str, fields: list[tuple[str, str, bool]]) -> Iterator[tuple[str, Any]]:
    _check_columns(location, ds.column_names, fields)
    wanted = [stored for _, stored, _ in fields if stored in ds.column_names]
    for i, obj in enumerate(ds.select_columns(wanted).to_list()):
        yield f"{location}[{i}]", obj


# ------------------------------------------------------------------------------ entry points


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_source(cfg: DataConfig) -> SourceInfo:
    """Identify `cfg.source` (kind, location, content hash) without parsing its records.

    Cheap for files (one hash pass), so that prepare can find reusable shards first.
    """
    source = cfg.source
    if source == "bundled":
        if not BUNDLED_SAMPLE.is_file():
            raise DataError(f"{BUNDLED_SAMPLE}: bundled sample not found (is the package installed completely?)")
        return SourceInfo(
            kind="jsonl",
            location=str(BUNDLED_SAMPLE),
            description="bundled Dolly-schema sample (CPython standard-library docstrings)",
            sha256=_sha256_file(BUNDLED_SAMPLE),
        )
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise DataError(f"{source}: is a directory; give a .jsonl, .json or .parquet file")
        kind = FILE_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{source}: unsupported file type '{path.suffix}' (use .jsonl, .json or .parquet)")
        return SourceInfo(kind=kind, location=source, description=f"local {kind} file {source}", sha256=_sha256_file(path))
    if _HUB_ID.match(source) and path.suffix.lower() not in _NOT_HUB_SUFFIXES:
        ds = _load_hub(source, cfg.hub_split)
        fingerprint = getattr(ds, "_fingerprint", None)
        digest = fingerprint or hashlib.sha256(f"{source}:{cfg.hub_split}".encode()).hexdigest()
        return SourceInfo(
            kind="hub",
            location=source,
            description=f"hub dataset {source} (split '{cfg.hub_split}')",
            sha256=str(digest),
        )
    raise DataError(f"{source}: file not found (and not a hub dataset id like 'owner/name')")


def load_records(cfg: DataConfig, info: Optional[SourceInfo] = None) -> tuple[list[dict[str, str]], SourceInfo]:
    """All valid records of `cfg.source`, normalised, plus where they came from.

    `info` is a `resolve_source(cfg)` result to avoid resolving twice.
    """
    info = info or resolve_source(cfg)
    fields = schema(cfg)
    if info.kind in ("jsonl", "json"):
        data = Path(info.location).expanduser().read_bytes()
        if not data.strip():
            raise DataError(f"{info.location}: empty file")
        reader = _jsonl_objects if info.kind == "jsonl" else _json_array_objects
        objects = reader(info.location, data)
    elif info.kind == "parquet":
        objects = _parquet_objects(info.location, fields)
    else:
        ds = _load_hub(info.location, cfg.hub_split)
        objects = _hub_objects(ds, f"{info.location}:{cfg.hub_split}", fields)

    records, rows, dropped = [], 0, 0
    for where, obj in objects:
        rows += 1
        rec = _normalise(obj, fields, where)
        if _is_empty(rec):
            dropped += 1
            continue
        records.append(rec)
    if rows == 0:
        raise DataError(f"{info.location}: no records")
    if not records:
        what = "text" if is_text_format(cfg) else "instruction or response"
        raise DataError(f"{info.location}: no usable records (all {rows} have an empty {what})")
    if cfg.max_examples is not None:
        records = records[: cfg.max_examples]
    return records, dataclasses.replace(info, rows=rows, dropped_empty=dropped, records=len(records))
