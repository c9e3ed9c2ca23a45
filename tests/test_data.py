"""Data pipeline: sources -> templates -> prepare (shards + manifest) -> loader."""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distrib_gpt.config import DataConfig
from distrib_gpt.data import BatchLoader, DataError, TokenizedSplit, format_prompt, load_records, prepare_data
from distrib_gpt.data import prepare as prepare_mod
from distrib_gpt.data import sources as sources_mod
from distrib_gpt.data.loader import PAD_DOC_ID, first_fit_decreasing
from distrib_gpt.data.templates import ALPACA_PROMPT, DOLLY_PROMPT_WITH_CONTEXT
from distrib_gpt.tokenizer import EOT_ID, gpt2_encoding

# ------------------------------------------------------------------------------ helpers


def make_cfg(tmp_path: Path, source, **kw) -> DataConfig:
    kw.setdefault("seq_len", 64)
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dolly_rows(n: int, words: int = 3) -> list[dict]:
    """Distinct records; the response names its index so tests can identify examples."""
    return [
        {
            "instruction": f"Question {i}: what is item {i}?",
            "context": f"Item {i} is described here." if i % 3 == 0 else "",
            "response": f"Answer number {i}." + " more" * (words * (i % 4)),
            "category": "open_qa",
        }
        for i in range(n)
    ]


def quiet(*_args) -> None:
    pass


def prep(cfg: DataConfig, **kw):
    return prepare_data(cfg, log=quiet, **kw)


def assert_nothing_built(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    leftovers = list(cache.iterdir()) if cache.exists() else []
    assert leftovers == [], f"left behind: {leftovers}"


def split_answers(prepared, split: str) -> set[int]:
    """Record indices (from 'Answer number N') of the examples in a split."""
    enc = gpt2_encoding()
    ts = TokenizedSplit.open(prepared.dir, split)
    out = set()
    for i in range(ts.n_examples):
        tokens, _ = ts.example(i)
        out.add(int(re.search(r"Answer number (\d+)", enc.decode(tokens.tolist())).group(1)))
    return out


def all_batches(loader: BatchLoader) -> list:
    return list(loader)


def same_batch(a, b) -> bool:
    return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "lines, expect",
    [
        (["GOOD", "GOOD", '{"instruction": "x", "response": '], r":3: malformed JSON: "),
        (["GOOD", '{"instruction": "x", "context": ""}'], r":2: missing field 'response'"),
        (["GOOD", "GOOD", "GOOD", '{"instruction": "x", "response": 42}'], r":4: field 'response' must be a string, got int"),
        (["GOOD", '{"instruction": null, "response": "y"}'], r":2: field 'instruction' must be a string, got null"),
        (["GOOD", '["instruction", "response"]'], r":2: expected a JSON object, got list"),
        (["GOOD", "", "   ", '{"instruction": ["x"], "response": "y"}'], r":4: field 'instruction' must be a string, got list"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, lines, expect):
    good = json.dumps(dolly_rows(1)[0])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(good if line == "GOOD" else line for line in lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        prep(make_cfg(tmp_path, path))
    msg = str(exc.value)
    assert msg.startswith(str(path) + ":"), msg
    assert re.search(re.escape(str(path)) + expect, msg), msg
    assert "\n" not in msg
    assert_nothing_built(tmp_path)


def test_non_utf8_byte_names_line(tmp_path):
    good = json.dumps(dolly_rows(1)[0]).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"instruction": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid UTF-8")):
        prep(make_cfg(tmp_path, path))
    assert_nothing_built(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: empty file")):
        prep(make_cfg(tmp_path, path))
    assert_nothing_built(tmp_path)


def test_file_without_records(tmp_path):
    path = tmp_path / "none.json"
    path.write_text("[]")
    with pytest.raises(DataError, match=re.escape(f"{path}: no records")):
        prep(make_cfg(tmp_path, path))
    assert_nothing_built(tmp_path)


def test_all_records_empty(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"instruction": " ", "response": "x"}, {"instruction": "q", "response": "\n"}])
    with pytest.raises(DataError, match="no usable records"):
        prep(make_cfg(tmp_path, path))
    assert_nothing_built(tmp_path)


def test_json_not_an_array(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": dolly_rows(3)}))
    with pytest.raises(DataError, match=re.escape(f"{path}: a .json source must be a top-level array of objects, got dict")):
        prep(make_cfg(tmp_path, path))
    assert_nothing_built(tmp_path)


def test_json_array_bad_element_names_index(tmp_path):
    rows = dolly_rows(3)
    rows[2]["response"] = 3.5
    path = tmp_path / "arr.json"
    path.write_text(json.dumps(rows, indent=1))
    with pytest.raises(DataError, match=re.escape(f"{path}[2]: field 'response' must be a string, got float")):
        prep(make_cfg(tmp_path, path))
    assert_nothing_built(tmp_path)


def test_json_malformed_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"instruction": "a", "response": "b"},\n{"instruction": "a" "response": "b"}\n]')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: malformed JSON")):
        prep(make_cfg(tmp_path, path))
    assert_nothing_built(tmp_path)


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "context": ["", ""]}), path)
    with pytest.raises(DataError) as exc:
        prep(make_cfg(tmp_path, path))
    assert str(exc.value).startswith(f"{path}: missing column 'response'")
    assert_nothing_built(tmp_path)


def test_parquet_bad_value_names_row(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b", "c"], "response": ["x", None, "z"]}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}[1]: field 'response' must be a string, got null")):
        prep(make_cfg(tmp_path, path))
    assert_nothing_built(tmp_path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        prep(make_cfg(tmp_path, tmp_path / "nope.jsonl"))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        prep(make_cfg(tmp_path, csv))
    assert_nothing_built(tmp_path)


def test_failure_after_tokenizing_removes_temp_dir(tmp_path):
    # every example is longer than seq_len + 1 and overlong=drop: the split ends up empty
    rows = [{"instruction": "q", "response": "word " * 200} for _ in range(6)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match="no examples left"):
        prep(make_cfg(tmp_path, path, overlong="drop"))
    assert_nothing_built(tmp_path)


# ------------------------------------------------------------------------------ formats


def test_dolly_jsonl_normalised(tmp_path):
    rows = dolly_rows(5)
    rows[1]["context"] = None  # null context is read as ""
    del rows[2]["context"]  # so is a missing one
    rows[3]["response"] = "   "  # dropped and counted, not an error
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "\n\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")  # blank lines skipped
    records, info = load_records(make_cfg(tmp_path, path))
    assert [set(r) for r in records] == [{"instruction", "context", "response"}] * 4
    assert records[1]["context"] == "" and records[2]["context"] == ""
    assert records[0]["context"] == "Item 0 is described here."
    assert (info.rows, info.dropped_empty, info.records) == (5, 1, 4)
    assert info.kind == "jsonl" and len(info.sha256) == 64


def test_max_examples_keeps_first_valid(tmp_path):
    rows = dolly_rows(6)
    rows[0]["instruction"] = ""
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    records, info = load_records(make_cfg(tmp_path, path, max_examples=3))
    assert [r["instruction"] for r in records] == [rows[i]["instruction"] for i in (1, 2, 3)]
    assert info.dropped_empty == 1 and info.records == 3


def test_alpaca_json(tmp_path):
    rows = [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour", "output": "Blue"},  # alpaca "input" is optional
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    records, _ = load_records(make_cfg(tmp_path, path, format="alpaca", template="alpaca"))
    assert records == [
        {"instruction": "Add", "context": "2 and 3", "response": "5"},
        {"instruction": "Name a colour", "context": "", "response": "Blue"},
    ]


def test_columns_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"q": ["a?", "b?"], "bg": ["ctx", None], "a": ["A.", "B."], "extra": [1, 2]}), path)
    cfg = make_cfg(tmp_path, path, format="columns", columns={"instruction": "q", "context": "bg", "response": "a"})
    records, info = load_records(cfg)
    assert records == [
        {"instruction": "a?", "context": "ctx", "response": "A."},
        {"instruction": "b?", "context": "", "response": "B."},
    ]
    assert info.kind == "parquet"
    # missing mapped column is named
    cfg = make_cfg(tmp_path, path, format="columns", columns={"instruction": "q", "response": "answer"})
    with pytest.raises(DataError, match="missing column 'answer'"):
        load_records(cfg)


def test_text_format_and_text_column(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Document {i} says hello."} for i in range(10)])
    cfg = make_cfg(tmp_path, path, format="text")
    records, _ = load_records(cfg)
    assert records[0] == {"text": "Document 0 says hello."}
    prepared = prep(cfg)
    ts = TokenizedSplit.open(prepared.dir, "train")
    for i in range(ts.n_examples):
        tokens, mask = ts.example(i)
        assert tokens[-1] == EOT_ID
        assert mask[0] == 0 and mask[1:].all()  # every token but the first is a target

    pq_path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["one two", "three"]}), pq_path)
    records, _ = load_records(make_cfg(tmp_path, pq_path, format="columns", columns={"text": "body"}))
    assert records == [{"text": "one two"}, {"text": "three"}]


def test_hub_source_offline(tmp_path, monkeypatch):
    import datasets  # a hard dependency: a broken install fails, it does not skip
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(dolly_rows(6))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sources_mod._load_hub.cache_clear()
    try:
        cfg = make_cfg(tmp_path, "someone/some-dolly", hub_split="train")
        records, info = load_records(cfg)
    finally:
        sources_mod._load_hub.cache_clear()
    assert calls == [("someone/some-dolly", "train")]  # cached: loaded once
    assert info.kind == "hub" and len(records) == 6
    assert records[0]["response"] == "Answer number 0."


# ------------------------------------------------------------------------------ templates


def test_templates(tmp_path):
    cfg = DataConfig()
    assert format_prompt("Do X", "", cfg) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X\n\n### Response:\n"
    )
    assert format_prompt("Do X", "Some input", cfg) == DOLLY_PROMPT_WITH_CONTEXT.format(instruction="Do X", context="Some input")
    assert "\n\nInput:\nSome input\n\n### Response:\n" in format_prompt("Do X", "Some input", cfg)
    alpaca = DataConfig(template="alpaca")
    assert format_prompt("Do X", " ", alpaca) == ALPACA_PROMPT.format(instruction="Do X")
    assert format_prompt("Do X", "ctx", alpaca).endswith("### Input:\nctx\n\n### Response:")
    assert format_prompt("Do X", "ctx", DataConfig(template="none")) == "Do X\n\nctx\n"
    assert format_prompt("Do X", "", DataConfig(template="none")) == "Do X\n"
    custom = DataConfig(template="custom", prompt_template="Q: {instruction}\nC: {context}\nA:", prompt_template_no_context="Q: {instruction}\nA:")
    assert format_prompt("hi", "there", custom) == "Q: hi\nC: there\nA:"
    assert format_prompt("hi", "", custom) == "Q: hi\nA:"
    with pytest.raises(DataError, match="unknown placeholder '{question}'"):
        format_prompt("hi", "", DataConfig(template="custom", prompt_template="{question} {instruction}"))


# ------------------------------------------------------------------------------ masking


def _four_records(tmp_path: Path, **kw):
    rows = [{"instruction": f"Say {w}", "context": "It is a test." if i % 2 else "", "response": f"Answer number {i}: {w}!"} for i, w in enumerate(["one", "two", "three", "four"])]
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "m.jsonl", rows), seq_len=128, val_fraction=0.25, **kw)
    return rows, cfg


def test_loss_mask_on_response_and_eot_only(tmp_path):
    rows, cfg = _four_records(tmp_path)
    prepared = prep(cfg)
    enc = gpt2_encoding()
    seen = 0
    for split in ("train", "val"):
        ts = TokenizedSplit.open(prepared.dir, split)
        for i in range(ts.n_examples):
            tokens, mask = ts.example(i)
            k = int(re.search(r"Answer number (\d)", enc.decode(tokens.tolist())).group(1))
            p = enc.encode_ordinary(format_prompt(rows[k]["instruction"], rows[k]["context"], cfg))
            r = enc.encode_ordinary(rows[k]["response"])
            assert tokens.tolist() == p + r + [EOT_ID]
            assert mask.tolist() == [0] * len(p) + [1] * (len(r) + 1)
            seen += 1
        # the same through the loader: labels are -100 exactly where the target is prompt
        # unshuffled pad batching sorts by length: the first row is the shortest example
        batch = next(iter(BatchLoader(ts, "pad", cfg.seq_len, batch_size=1, seed=0, shuffle=False)))
        tokens, mask = ts.example(int(np.argsort(ts.lengths, kind="stable")[0]))
        assert (batch.input_ids[0].numpy() == tokens[:-1]).all()
        labels = batch.labels[0].numpy()
        assert (labels == np.where(mask[1:] == 1, tokens[1:].astype(np.int64), -100)).all()
        assert labels[-1] == EOT_ID and labels[0] == -100
        assert batch.n_supervised == int(mask.sum())
    assert seen == 4


def test_train_on_prompt_supervises_all_but_first(tmp_path):
    _, cfg = _four_records(tmp_path, train_on_prompt=True)
    prepared = prep(cfg)
    ts = TokenizedSplit.open(prepared.dir, "train")
    for i in range(ts.n_examples):
        tokens, mask = ts.example(i)
        assert mask[0] == 0 and mask[1:].all()
    for batch in BatchLoader(ts, "pad", cfg.seq_len, batch_size=1, seed=0):
        assert (batch.labels != -100).all()  # one example per row: every target is supervised
        assert batch.n_supervised == batch.labels.numel()


# ------------------------------------------------------------------------------ overlong


def test_truncate_vs_drop(tmp_path):
    rows = dolly_rows(12)
    for i in (1, 5, 9):
        rows[i]["response"] = "This answer goes on and on. " * 40  # far past 65 tokens
    rows[7]["instruction"] = "A question that is long. " * 30  # prompt alone exceeds seq_len + 1
    path = write_jsonl(tmp_path / "o.jsonl", rows)

    def totals(prepared, key):
        return sum(prepared.manifest["splits"][s][key] for s in ("train", "val"))

    trunc = prep(make_cfg(tmp_path, path, overlong="truncate"))
    assert totals(trunc, "truncated") == 3
    assert totals(trunc, "dropped_overlong") == 1  # nothing supervised would remain
    assert totals(trunc, "examples") == 11
    lengths = np.concatenate([TokenizedSplit.open(trunc.dir, s).lengths for s in ("train", "val")])
    assert lengths.max() == 65

    drop = prep(make_cfg(tmp_path, path, overlong="drop"))
    assert drop.dir != trunc.dir
    assert totals(drop, "truncated") == 0
    assert totals(drop, "dropped_overlong") == 4
    assert totals(drop, "examples") == 8
    assert max(TokenizedSplit.open(drop.dir, s).lengths.max() for s in ("train", "val")) <= 65


# ------------------------------------------------------------------------------ split


def test_deterministic_split(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", dolly_rows(40))
    a = prep(make_cfg(tmp_path / "a", path, val_fraction=0.2, split_seed=1))
    b = prep(make_cfg(tmp_path / "b", path, val_fraction=0.2, split_seed=1))
    c = prep(make_cfg(tmp_path / "c", path, val_fraction=0.2, split_seed=2))
    assert not b.reused  # a separate cache: really rebuilt
    val_a, train_a = split_answers(a, "val"), split_answers(a, "train")
    assert len(val_a) == 8 and len(train_a) == 32
    assert not (val_a & train_a) and (val_a | train_a) == set(range(40))
    assert split_answers(b, "val") == val_a
    val_c = split_answers(c, "val")
    assert val_c != val_a and len(val_c) == 8
    assert not (val_c & split_answers(c, "train"))


def test_too_small_to_split(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", dolly_rows(1))
    with pytest.raises(DataError, match="cannot make a train and a validation split"):
        prep(make_cfg(tmp_path, path))
    assert_nothing_built(tmp_path)


# ------------------------------------------------------------------------------ manifest / reuse


def test_manifest_and_reuse(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "r.jsonl", dolly_rows(30))
    cfg = make_cfg(tmp_path, path)
    first = prep(cfg)
    assert not first.reused
    m = first.manifest
    assert first.dir.name == m["key"] and first.dir.parent == tmp_path / "cache"
    assert m["tokenizer"]["n_vocab"] == 50257 and m["source"]["rows"] == 30
    assert m["settings"]["seq_len"] == 64 and "numpy" in m["versions"]
    assert json.loads((first.dir / "manifest.json").read_text()) == m
    assert m["splits"]["train"]["examples"] + m["splits"]["val"]["examples"] == 30
    assert m["counts"]["val"] == {k: v for k, v in m["splits"]["val"].items() if k != "shards"}
    assert m["counts"]["source"] == {"rows": 30, "dropped_empty": 0, "records": 30}
    for s in m["splits"]["train"]["shards"]:
        tokens = np.load(first.dir / s["tokens"], mmap_mode="r")
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        offsets = np.load(first.dir / s["offsets"])
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
        assert len(offsets) == s["examples"] + 1
        assert np.load(first.dir / s["mask"]).dtype == np.uint8

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prepare_mod, "_tokenize_records", boom)
    logs = []
    second = prepare_data(cfg, log=logs.append)
    assert second.reused and second.dir == first.dir and second.manifest == m
    assert any("reusing" in line for line in logs)

    # the same content under another name is the same source: the key is content-based
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())
    assert prep(make_cfg(tmp_path, copy)).reused

    # anything that changes the tokens makes a new key
    monkeypatch.undo()
    for change in ({"seq_len": 128}, {"train_on_prompt": True}, {"template": "alpaca"}, {"split_seed": 7}):
        other = prep(make_cfg(tmp_path, path, **change))
        assert not other.reused and other.dir != first.dir, change

    # a damaged directory is rebuilt, not trusted
    (first.dir / m["splits"]["val"]["shards"][0]["mask"]).unlink()
    rebuilt = prep(cfg)
    assert not rebuilt.reused and rebuilt.dir == first.dir
    assert (first.dir / m["splits"]["val"]["shards"][0]["mask"]).exists()


def test_stale_temp_dirs_cleaned(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", dolly_rows(10))
    cache = tmp_path / "cache"
    stale = cache / ".tmp-0123456789abcdef-999999999"  # no such pid
    stale.mkdir(parents=True)
    (stale / "train-00000.tokens.npy").write_bytes(b"partial")
    live = cache / f".tmp-fedcba9876543210-{os.getppid()}"  # a running process: left alone
    live.mkdir()
    prepared = prep(make_cfg(tmp_path, path))
    assert not stale.exists()
    assert live.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([prepared.dir.name, live.name])


def test_multiple_shards_give_identical_batches(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", dolly_rows(40))
    one = prep(make_cfg(tmp_path / "one", path))
    many = prep(make_cfg(tmp_path / "many", path, shard_tokens=300))
    assert len(many.manifest["splits"]["train"]["shards"]) > 3
    assert all(s["n_tokens"] <= 300 for s in many.manifest["splits"]["train"]["shards"])
    for mode in ("pack", "pad"):
        a = all_batches(BatchLoader(TokenizedSplit.open(one.dir, "train"), mode, 64, 4, seed=3))
        b = all_batches(BatchLoader(TokenizedSplit.open(many.dir, "train"), mode, 64, 4, seed=3))
        assert len(a) == len(b) and all(same_batch(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ loader


@pytest.fixture
def train_split(tmp_path) -> TokenizedSplit:
    path = write_jsonl(tmp_path / "l.jsonl", dolly_rows(60, words=4))
    # template "none" keeps prompts short: with seq_len 64 nothing is truncated
    prepared = prep(make_cfg(tmp_path, path, val_fraction=0.1, template="none"))
    assert prepared.manifest["splits"]["train"]["truncated"] == 0  # every example ends in EOT
    return TokenizedSplit.open(prepared.dir, "train")


def _examples_from_pack(batches) -> list[tuple]:
    """Undo document-masked packing with the batches' document ids: an example is the
    inputs of one id, plus the row's last token when it ends a full row (that token,
    the example's end-of-text, is then a target only)."""
    out = []
    for b in batches:
        for r in range(b.input_ids.shape[0]):
            x, doc = b.input_ids[r].tolist(), b.doc_ids[r].tolist()
            ids = sorted(set(doc) - {PAD_DOC_ID})
            for d in ids:
                ex = [t for t, i in zip(x, doc) if i == d]
                if d == ids[-1] and b.labels[r, -1] != -100:  # its end-of-text (always a target)
                    ex.append(int(b.labels[r, -1]))
                out.append(tuple(ex))
    return out


def _examples_from_pad(batches) -> list[tuple]:
    out = []
    for b in batches:
        for r in range(b.input_ids.shape[0]):
            x = b.input_ids[r].numpy()
            n = int(np.flatnonzero(x == EOT_ID)[0]) if (x == EOT_ID).any() else len(x)
            out.append(tuple(x[:n]) + (EOT_ID,))
    return out


def test_pack_and_pad_supervise_the_same_tokens(train_split):
    pack = all_batches(BatchLoader(train_split, "pack", 64, 3, seed=5))
    pad = all_batches(BatchLoader(train_split, "pad", 64, 3, seed=5))

    def targets(batches):
        return collections.Counter(t for b in batches for t in b.labels[b.labels != -100].tolist())

    assert sum(b.n_supervised for b in pack) == sum(b.n_supervised for b in pad) == train_split.n_supervised
    assert targets(pack) == targets(pad)
    # and the same examples, each exactly once and whole
    stored = sorted(tuple(train_split.example(i)[0].tolist()) for i in range(train_split.n_examples))
    assert sorted(_examples_from_pack(pack)) == stored
    assert sorted(_examples_from_pad(pad)) == stored
    # pad rows are length-bucketed: less padding than padding every row to the longest example
    naive = int((train_split.lengths.max() - train_split.lengths).sum())
    assert sum(b.n_pad for b in pad) < naive / 2


def test_pack_rows_hold_whole_examples_at_their_own_positions(train_split):
    seq = 64
    for b in all_batches(BatchLoader(train_split, "pack", seq, 3, seed=5)):
        assert b.input_ids.shape[1] == seq and b.doc_ids.shape == b.position_ids.shape == b.input_ids.shape
        pairs = 0
        for r in range(b.input_ids.shape[0]):
            doc, pos = b.doc_ids[r], b.position_ids[r]
            real = doc != PAD_DOC_ID
            n = int(real.sum())
            assert real[:n].all() and not real[n:].any()  # the padding is the row's tail
            assert (b.input_ids[r, n:] == EOT_ID).all() and (b.labels[r, n:] == -100).all()
            if n < seq:  # the last example's end-of-text is followed by padding, not a target
                assert b.labels[r, n - 1] == -100
            ids = doc[:n]
            assert (ids.diff() >= 0).all() and (ids.diff() <= 1).all() and ids[0] == 0  # 0, 0, .., 1, 1, ..
            for d in ids.unique().tolist():
                where = (ids == d).nonzero().squeeze(1)
                assert torch.equal(pos[where], torch.arange(len(where)))  # restart at 0 per example
                if where[0] > 0:  # its first token is never the previous example's target
                    assert b.labels[r, where[0] - 1] == -100
                pairs += len(where) ** 2
        assert b.n_attention_pairs == pairs  # what training_flops charges: per example, not per row


def test_pack_concat_is_the_same_rows_read_as_one_text(train_split):
    masked = all_batches(BatchLoader(train_split, "pack", 64, 3, seed=5))
    concat = all_batches(BatchLoader(train_split, "pack_concat", 64, 3, seed=5))
    assert len(masked) == len(concat)
    for m, c in zip(masked, concat):
        assert same_batch(m, c) and torch.equal(m.target_index, c.target_index)
        assert (m.n_real_tokens, m.n_pad, m.n_supervised) == (c.n_real_tokens, c.n_pad, c.n_supervised)
        assert c.doc_ids is None and c.position_ids is None  # plain causal rows, positions 0..T-1
        row_real = (m.doc_ids != PAD_DOC_ID).sum(1)
        assert c.n_attention_pairs == int((row_real**2).sum())  # a whole row attends to itself
        assert c.n_attention_pairs > m.n_attention_pairs


def test_first_fit_leaves_no_two_rows_that_could_be_merged(train_split):
    """First-fit's guarantee (here one chunk holds every example): a row that another
    row's examples would fit into would have taken them, so any two rows together exceed
    seq_len + 1 tokens, and at most one row is at most half full."""
    seq = 64
    for seed in (0, 1):
        tokens = []  # per row; a full row's last token is a target only (its label, EOT)
        for b in all_batches(BatchLoader(train_split, "pack", seq, 2, seed=seed)):
            tokens += ((b.doc_ids != PAD_DOC_ID).sum(1) + (b.labels[:, -1] != -100)).tolist()
        assert sum(tokens) == train_split.n_tokens
        assert all(a + b > seq + 1 for i, a in enumerate(tokens) for b in tokens[i + 1 :])
        assert sum(t <= (seq + 1) / 2 for t in tokens) <= 1
        assert len(tokens) < train_split.n_examples / 2  # several examples a row


def test_plan_first_fit_decreasing():
    assert first_fit_decreasing(np.array([5, 4, 3, 3, 2, 1]), 7) == [[0, 4], [1, 2], [3, 5]]
    assert first_fit_decreasing(np.array([7, 7]), 7) == [[0], [1]]
    assert first_fit_decreasing(np.array([], dtype=np.int64), 7) == []


def test_batch_shapes_and_counts(train_split):
    for mode in ("pack", "pack_concat", "pad"):
        loader = BatchLoader(train_split, mode, 64, 4, seed=0)
        batches = all_batches(loader)
        assert len(batches) == len(loader) > 0
        for b in batches:
            assert b.input_ids.dtype == torch.int64 and b.labels.dtype == torch.int64
            assert b.input_ids.shape == b.labels.shape and b.input_ids.shape[1] <= 64
            assert b.n_real_tokens + b.n_pad == b.input_ids.numel()
            assert b.n_supervised == int((b.labels != -100).sum())
            moved = b.to("cpu", non_blocking=True)
            assert torch.equal(moved.input_ids, b.input_ids) and moved.n_pad == b.n_pad


def test_epochs_shuffle_deterministically(train_split):
    loader = BatchLoader(train_split, "pack", 64, 4, seed=9)
    e0 = all_batches(loader)
    assert all(same_batch(a, b) for a, b in zip(e0, all_batches(loader)))
    loader.set_epoch(1)
    e1 = all_batches(loader)
    assert not all(same_batch(a, b) for a, b in zip(e0, e1))
    loader.set_epoch(0)
    assert all(same_batch(a, b) for a, b in zip(e0, all_batches(loader)))
    # resume: iter_from(k) continues exactly where batch k would have been
    assert all(same_batch(a, b) for a, b in zip(e0[3:], loader.iter_from(3)))
    assert len(list(loader.iter_from(len(loader)))) == 0
    with pytest.raises(ValueError):
        next(loader.iter_from(len(loader) + 1))


@pytest.mark.parametrize("mode", ["pack", "pack_concat", "pad"])
@pytest.mark.parametrize("batch_size", [3, 4, 5])
def test_two_ranks(train_split, mode, batch_size):
    full = all_batches(BatchLoader(train_split, mode, 64, batch_size, seed=2))
    g = len(full)
    ranks = [BatchLoader(train_split, mode, 64, batch_size, seed=2, rank=r, world_size=2) for r in (0, 1)]
    streams = [all_batches(loader) for loader in ranks]
    assert len(streams[0]) == len(streams[1]) == len(ranks[0]) == -(-g // 2)
    # deterministic: a fresh loader on the same rank yields the same batches
    again = all_batches(BatchLoader(train_split, mode, 64, batch_size, seed=2, rank=1, world_size=2))
    assert all(same_batch(a, b) for a, b in zip(streams[1], again))

    def index_in_full(batch) -> int:
        hits = [i for i, f in enumerate(full) if same_batch(f, batch)]
        assert len(hits) == 1
        return hits[0]

    idx = [[index_in_full(b) for b in s] for s in streams]
    assert set(idx[0]) | set(idx[1]) == set(range(g))  # every block/batch is covered
    overlap = set(idx[0]) & set(idx[1])
    if g % 2 == 0:
        assert overlap == set()
    else:  # padded by repeating the first batch, as DistributedSampler does
        assert overlap == {0} and idx[1][-1] == 0
    assert idx[0] == list(range(0, g, 2))


def test_loader_rejects_bad_arguments(train_split):
    with pytest.raises(ValueError):
        BatchLoader(train_split, "pack", 64, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        BatchLoader(train_split, "stack", 64, 4, seed=0)
    for mode in ("pack", "pad"):  # examples were prepared for seq_len 64
        with pytest.raises(ValueError, match="train split has examples of .* tokens .* holds at most 9"):
            BatchLoader(train_split, mode, 8, 4, seed=0)


# ------------------------------------------------------------------------------ bundled sample


def test_bundled_sample():
    path = sources_mod.BUNDLED_SAMPLE
    assert path.is_file() and path.stat().st_size <= 5 * 1024 * 1024
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 1000
    categories = collections.Counter()
    for line in lines:
        rec = json.loads(line)
        assert set(rec) == {"instruction", "context", "response", "category"}
        assert all(isinstance(v, str) for v in rec.values())
        categories[rec["category"]] += 1
    assert {"open_qa", "closed_qa", "summarization", "information_extraction", "classification"} <= set(categories)
    records, info = load_records(DataConfig())
    assert len(records) == len(lines) and info.dropped_empty == 0
    assert info.description.startswith("bundled")
