"""bench/tables.py: the benchmark tables in the docs are exactly what bench/results/*.json gives.

Fast (no torch): the generator is loaded from its file and run in check mode.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tables():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "bench" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _load_tables()


def _json(filename: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / filename).read_text())


def test_docs_equal_what_the_generator_writes(capsys):
    docs = tables.generate()
    assert docs, "no doc has a table marker: the generator checks nothing"
    stale = [str(p.relative_to(ROOT)) for p, (old, new) in docs.items() if old != new]
    assert not stale, f"{stale} differ from bench/results/*.json: run `python bench/tables.py`"
    assert tables.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_every_table_function_is_used_in_a_doc():
    used = {name for path in tables.doc_files() for name in tables.markers(path.read_text(encoding="utf-8"))}
    assert set(tables.TABLES) <= used, f"tables no doc shows: {sorted(set(tables.TABLES) - used)}"


def test_no_unknown_or_malformed_marker_in_the_docs():
    # deliberately looser than the generator's own pattern: any "table:" comment counts
    loose = re.compile(r"<!--\s*/?\s*table\s*:\s*([^\s>]*)")
    for path in tables.doc_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in loose.findall(line):
                where = f"{path.relative_to(ROOT)}:{lineno}"
                assert name in tables.TABLES, f"{where}: table {name!r} is unknown to bench/tables.py"
                assert re.fullmatch(rf"<!-- /?table:{re.escape(name)} -->", line.strip()), f"{where}: malformed marker"


def test_check_mode_fails_with_a_diff_on_a_stale_doc(tmp_path, monkeypatch, capsys):
    current = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    stale = current.replace("| 1.00x |", "| 9.99x |", 1)
    assert stale != current
    doc = tmp_path / "benchmarks.md"
    doc.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(tables, "doc_files", lambda: [doc])
    assert tables.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^-.*\| 9\.99x \|", out, re.M)  # the diff removes the stale row ...
    assert re.search(r"^\+.*\| 1\.00x \|", out, re.M)  # ... and adds the generated one
    assert doc.read_text(encoding="utf-8") == stale  # --check writes nothing
    assert tables.main([]) == 0
    assert doc.read_text(encoding="utf-8") == current


@pytest.mark.parametrize(
    "bad_text, where, message",
    [
        ("<!-- table:no_such_table -->\n<!-- /table:no_such_table -->\n", 1, "unknown table 'no_such_table'"),
        ("<!-- table:quickstart -->\ntext\n", 1, "'quickstart' is never closed"),
        ("<!-- table:quickstart -->\n<!-- /table:int8_kernels -->\n", 2, "closes table 'quickstart' (line 1)"),
        ("text\n<!-- /table:quickstart -->\n", 2, "closes no open table"),
        ("text <!-- table:quickstart --> text\n", 1, "malformed table marker"),
        ("<!--table:quickstart-->\n", 1, "malformed table marker"),
    ],
)
def test_marker_errors_name_the_place(bad_text, where, message):
    with pytest.raises(tables.TableError, match=re.escape(message)) as e:
        tables.render(bad_text, "docs/x.md", {})
    assert str(e.value).startswith(f"docs/x.md:{where}: ")


# (table, key path removed from its JSON, dotted key the error must name)
MISSING = [
    ("train_throughput", ("median_tokens_per_s", "hf_trainer"), "median_tokens_per_s.hf_trainer"),
    ("train_throughput", ("settings", "steps"), "settings.steps"),
    ("quickstart", ("summary", "train_loss_by_epoch"), "summary.train_loss_by_epoch"),
    ("int8_gpt2_124m", ("gpt2_124m_random", "variants", "fp32", "file_bytes"),
     "gpt2_124m_random.variants.fp32.file_bytes"),
    ("int8_quickstart", ("trained", "variants", "int8_dynamic", "prefill_ms_batch1"),
     "trained.variants.int8_dynamic.prefill_ms_batch1"),
    ("int8_ours_vs_hf", ("trained", "ours_vs_hf"), "trained.ours_vs_hf"),
    ("int8_kernels", ("kernels_batch1_us",), "kernels_batch1_us"),
    ("int8_targets", ("gpt2_124m_random",), "gpt2_124m_random"),
    ("plan_vs_measured", ("raw",), "raw"),
]


@pytest.mark.parametrize("name, path, dotted", MISSING, ids=[f"{m[0]}:{m[2]}" for m in MISSING])
def test_a_missing_key_names_the_json_file_and_the_key(name, path, dotted):
    filename, fn = tables.TABLES[name]
    data = copy.deepcopy(_json(filename))
    fn(tables.Results(filename, data))  # the intact JSON renders
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(tables.TableError) as e:
        fn(tables.Results(filename, data))
    assert f"bench/results/{filename}" in str(e.value)
    assert f"missing key {dotted!r}" in str(e.value)


def test_train_throughput_renders_before_after_only_when_present():
    data = copy.deepcopy(_json("train_throughput.json"))
    data.pop("before_after", None)
    without = tables.table_train_throughput(tables.Results("train_throughput.json", data))
    assert "Before / after" not in without
    data["before_after"] = {
        "label_before": "old trainer", "label_after": "new trainer",
        "before_tokens_per_s": [1000.0, 3000.0, 2000.0], "after_tokens_per_s": [5000.0, 4000.0, 6000.0],
    }
    text = tables.table_train_throughput(tables.Results("train_throughput.json", data))
    assert "| old trainer | 1,000, 3,000, 2,000 | 2,000 | 1.00x |" in text  # median 2,000
    assert "| new trainer | 5,000, 4,000, 6,000 | 5,000 | 2.50x |" in text  # median 5,000, 5,000 / 2,000
    del data["before_after"]["after_tokens_per_s"]
    with pytest.raises(tables.TableError, match=re.escape("missing key 'before_after.after_tokens_per_s'")):
        tables.table_train_throughput(tables.Results("train_throughput.json", data))


def test_command_and_provenance_come_from_the_json():
    data = copy.deepcopy(_json("int8_inference.json"))
    data["settings"]["rounds"] = 7
    data["settings"]["skip_gpt2"] = True
    data["machine"]["torch"] = "9.9.9"
    text = tables.provenance(tables.Results("int8_inference.json", data))
    assert "python bench/int8_inference.py " in text and "--rounds 7" in text and "--skip-gpt2" in text
    assert "--out bench/results/int8_inference.json" in text
    assert "torch 9.9.9" in text
    assert "Not recorded in it: date" in text  # int8_inference.py records no date
    data["date"] = "2030-01-02"
    assert "date 2030-01-02" in tables.provenance(tables.Results("int8_inference.json", data))


def test_the_script_runs_without_torch():
    code = (
        "import runpy, sys; sys.argv = ['bench/tables.py', '--check']\n"
        "try:\n    runpy.run_path('bench/tables.py', run_name='__main__')\n"
        "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "exit 0 False", out.stdout + out.stderr
