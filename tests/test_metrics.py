"""Every figure of summary.json against a measurement taken another way.

The code's own formulas are not the reference here: FLOPs are counted by torch's
FlopCounterMode on real steps, time by the test's own clock, memory by a temporary the test
allocates, sizes by `du`, and the final loss by transformers on the exported weights.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from distrib_gpt import metrics as M
from distrib_gpt import train as T
from distrib_gpt.checkpoint import Checkpointer, export_hf, load_consolidated
from distrib_gpt.config import LoRAConfig, load_config
from distrib_gpt.data import BatchLoader, TokenizedSplit, prepare_data
from distrib_gpt.data.loader import PAD_DOC_ID
from distrib_gpt.lora import apply_lora
from distrib_gpt.model import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from tiny_run import tiny_run  # noqa: E402

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=64)


def run_cfg(tmp_path: Path, name: str, *extra: str):
    return load_config(None, tiny_run(tmp_path / "cache", tmp_path / "runs", name, "train.epochs=1", *extra))


def counted_flops(model: GPT, batch) -> tuple[int, int]:
    """(forward, backward) FLOPs of one training pass as torch's FlopCounterMode counts them.
    The math SDPA backend, because the CPU's fused attention kernel is not in the counter's
    table (it would count attention as 0)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(batch.input_ids, batch.labels, reduction="sum", return_logits=False, **batch.model_inputs())
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops() - forward


def counted_flops_per_example(model: GPT, batch) -> int:
    """Forward + backward FLOPs of a batch's examples, each run alone and unpadded, as the
    counter counts them: the model work of a document-masked packed batch (whose kernel
    executes the row's full square)."""
    total = 0
    for r in range(batch.input_ids.shape[0]):
        docs = batch.doc_ids[r] if batch.doc_ids is not None else torch.zeros_like(batch.input_ids[r])
        for d in docs.unique().tolist():
            if d == PAD_DOC_ID:
                continue
            where = (docs == d).nonzero().squeeze(1)
            labels = batch.labels[r, where][None]
            alone = SimpleNamespace(input_ids=batch.input_ids[r, where][None], labels=labels,
                                    model_inputs=lambda: {})
            total += sum(counted_flops(model, alone))
    return total


def loader_for(cfg, split: str = "train", **kw) -> BatchLoader:
    prepared = prepare_data(cfg.data, log=lambda *a: None)
    data = TokenizedSplit.open(prepared.dir, split)
    return BatchLoader(data, cfg.data.batching, cfg.data.seq_len, kw.pop("batch_size", cfg.train.micro_batch_size),
                       seed=cfg.run.seed, **kw)


# ------------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("train_on_prompt", [False, True], ids=["prompt-masked", "all-supervised"])
@pytest.mark.parametrize("lora_targets", [None, ["attn.c_attn", "mlp.c_fc"], ["mlp.c_proj"],
                                          ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]],
                         ids=["full", "lora-qkv-fc", "lora-last-only", "lora-all"])
def test_training_flops_equal_flop_counter_on_a_real_batch(tmp_path, train_on_prompt, lora_targets):
    cfg = run_cfg(tmp_path, "x", f"data.train_on_prompt={str(train_on_prompt).lower()}", "train.micro_batch_size=3")
    batch = next(iter(loader_for(cfg)))
    share = batch.n_supervised / batch.n_real_tokens  # an example's first token is never a target
    assert share > 0.9 if train_on_prompt else share < 0.6, share
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE))
    if lora_targets:
        apply_lora(model, LoRAConfig(enabled=True, rank=4, targets=lora_targets))
    B, T_ = batch.input_ids.shape
    # what the kernels execute: every position of the rows, the full square of each (the
    # dense document mask hides pairs but does not skip them)
    executed = M.training_flops(model, M.StepWork(B * T_, B * T_ * T_, batch.n_supervised))
    assert executed == counted_flops(model, batch)
    # the model work MFU charges: each example alone
    work = M.StepWork(batch.n_real_tokens, batch.n_attention_pairs, batch.n_supervised)
    assert sum(M.training_flops(model, work)) == counted_flops_per_example(model, batch)


def test_padded_positions_are_executed_but_not_counted(tmp_path):
    """pad batching: the kernels run every position of the padded batch (what the counter
    sees); the summary counts real positions only. Both follow the same structure."""
    cfg = run_cfg(tmp_path, "x", "data.batching=pad", "train.micro_batch_size=4")
    batch = next(b for b in loader_for(cfg) if b.n_pad > 0)
    model = GPT(GPTConfig(**SHAPE))
    B, T_ = batch.input_ids.shape
    executed = M.training_flops(model, M.StepWork(B * T_, B * T_ * T_, batch.n_supervised))
    assert executed == counted_flops(model, batch)
    real = M.training_flops(model, M.StepWork(batch.n_real_tokens, batch.n_attention_pairs, batch.n_supervised))
    assert sum(real) < sum(executed)


def test_summary_flops_and_mfu_are_those_of_the_timed_steps(tmp_path):
    cfg = run_cfg(tmp_path, "f", "train.max_steps=3", "train.micro_batch_size=4")
    s = T.train(cfg)
    assert s["timed_steps"] == 2  # the first step is not timed
    loader = loader_for(cfg)
    loader.set_epoch(0)
    batches = list(loader)[1:3]
    model = GPT(GPTConfig(**SHAPE))  # FLOPs do not depend on the weights
    assert batches[0].doc_ids is not None  # packed: several examples a row, masked
    expected = sum(counted_flops_per_example(model, b) for b in batches)
    assert s["flops_timed"] == expected
    assert s["mfu"] == pytest.approx(s["flops_timed"] / (s["timed_s"] * s["peak_flops"]), rel=1e-9)
    assert s["mfu_peak_source"] == "measured" and 0 < s["mfu"] < 1
    assert s["tokens_per_s"] == pytest.approx(sum(b.n_real_tokens for b in batches) / s["timed_s"], rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_measured_cpu_peak_is_a_real_matmul_rate(dtype):
    """The calibration against the test's own timing of one Linear layer's product (a
    2048 x 512 batch through a 512 x 512 layer): the calibrated peak is at least about what
    that product reaches, and not absurdly more. (fp16 on a CPU: its kernels differ by
    layout, the reason the calibration times F.linear.)"""
    peak = M.measure_matmul_flops(torch.device("cpu"), dtype)
    x, w = torch.randn(2048, 512).to(dtype), torch.randn(512, 512).to(dtype)
    layer = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    layer()
    ours = 2 * 2048 * 512 * 512 / min(_timed(layer) for _ in range(5))
    assert 0.5 * ours <= peak <= 20 * ours, (peak, ours)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ time


def test_slow_checkpoint_saves_are_not_training_time(tmp_path, monkeypatch):
    """A save that takes 1 s after every step: before the fix it was charged to the next step
    (a step then "took" over a second, and tokens/s fell several-fold). tokens/s is compared as
    a ratio with the same run without saves, run before and after it, so machine load shifts
    both."""
    sleep_s = 1.0
    original = Checkpointer.save

    def slow_save(self, *a, **kw):
        time.sleep(sleep_s)
        return original(self, *a, **kw)

    common = ("train.max_steps=5", "train.micro_batch_size=2", "checkpoint.every_epoch=false", "checkpoint.save_final=false")
    plain_a = T.train(run_cfg(tmp_path, "a", *common))
    monkeypatch.setattr(Checkpointer, "save", slow_save)
    saving = T.train(run_cfg(tmp_path, "s", *common, "checkpoint.every_steps=1"))
    monkeypatch.undo()
    plain_b = T.train(run_cfg(tmp_path, "b", *common))

    assert len(saving["checkpoint_time_s"]) == 4  # after steps 1..4, not after the last one
    assert all(t >= sleep_s for t in saving["checkpoint_time_s"])
    assert saving["checkpoint_time_total_s"] == pytest.approx(sum(saving["checkpoint_time_s"]))
    def step_times(name: str) -> list[float]:  # steps 2.. (a save precedes each in the saving run)
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["step_time_s"] for x in lines][1:]

    plain_step = max(statistics.median(step_times("a")), statistics.median(step_times("b")))
    assert statistics.median(step_times("s")) < plain_step + sleep_s / 2  # charged a save, it would be >= + sleep_s
    assert saving["epoch_time_s"][0] < saving["checkpoint_time_total_s"]
    # tokens/s of 4 timed tiny steps is noisy (the step after a 1 s sleep also wakes idle
    # threads); charged the saves, it would be 1 s + a step per step: far below a quarter
    slowest_plain = min(plain_a["tokens_per_s"], plain_b["tokens_per_s"])
    assert saving["tokens_per_s"] > 0.25 * slowest_plain
    assert plain_a["checkpoint_time_s"] == [] and plain_a["checkpoint_time_total_s"] == 0


def test_time_by_phase_adds_up_to_the_wall_clock(tmp_path):
    cfg = run_cfg(tmp_path, "w", "train.epochs=2", "train.micro_batch_size=2", "checkpoint.every_steps=3")
    t0 = time.perf_counter()
    s = T.train(cfg)
    wall = time.perf_counter() - t0
    parts = s["setup_time_s"] + s["eval_time_s"] + s["train_time_s"] + s["checkpoint_time_total_s"] + s["final_save_time_s"]
    assert all(s[k] > 0 for k in ("setup_time_s", "eval_time_s", "train_time_s", "checkpoint_time_total_s", "final_save_time_s"))
    assert abs(parts - wall) <= 0.05 * wall, (parts, wall)
    assert s["wall_time_s"] <= wall
    assert sum(s["epoch_time_s"]) == pytest.approx(s["train_time_s"], rel=1e-6)
    assert s["timed_s"] < s["train_time_s"]  # the first step is not timed


# ------------------------------------------------------------------------------------ memory


def test_setup_temporary_is_not_in_the_training_peak(tmp_path, monkeypatch):
    """Set-up allocates (and frees) 400 MB: the set-up peak shows it, the training peak does
    not. Compared with the same run without the temporary, run first (it also loads what a
    first run loads: tokenizer, libraries), so the comparison is like for like."""
    reference = T.train(run_cfg(tmp_path, "ref", "train.max_steps=3"))
    original = T.build_model
    big = 400 * 2**20

    def build_with_temporary(cfg):
        scratch = np.ones(big // 8)  # touched, so resident
        assert scratch.sum() == big // 8
        del scratch
        return original(cfg)

    monkeypatch.setattr(T, "build_model", build_with_temporary)
    s = T.train(run_cfg(tmp_path, "m", "train.max_steps=3"))
    assert s["setup_peak_host_rss_bytes"] >= s["peak_host_rss_bytes"] + 0.75 * big
    assert s["peak_host_rss_bytes"] < reference["peak_host_rss_bytes"] + big / 4
    assert "clear_refs" in s["peak_host_rss_how"]
    phases = s["per_rank"][0]["peak_memory_by_phase"]
    assert phases["train"]["host_rss_bytes"] == s["peak_host_rss_bytes"]
    assert s["peak_gpu_mem_bytes"] is None and s["setup_peak_gpu_mem_bytes"] is None  # CPU run


# ------------------------------------------------------------------------------------ sizes, loss


def test_checkpoint_bytes_equal_du(tmp_path):
    s = T.train(run_cfg(tmp_path, "d", "train.max_steps=2", "checkpoint.every_steps=1"))
    run = tmp_path / "runs" / "d"

    def du(path: Path) -> int:
        out = subprocess.run(["du", "-s", "--apparent-size", "-B1", str(path)], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0])

    assert s["checkpoint_bytes"] == du(run / "checkpoint")
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert s["sharded_checkpoint_bytes"] == du(run / "checkpoints" / latest)


def test_final_val_loss_equals_transformers_on_the_exported_weights(tmp_path):
    import transformers

    cfg = run_cfg(tmp_path, "h", "train.max_steps=4", "eval.val_batches=null")
    s = T.train(cfg)
    export_hf(load_consolidated(tmp_path / "runs" / "h" / "checkpoint"), tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in loader_for(cfg, "val", shuffle=False):
            logits = hf(b.input_ids).logits.float()
            keep = b.labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], b.labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert s["val_loss_by_epoch"][-1] == pytest.approx(total / count, rel=1e-4)


def test_summary_keys_are_documented(tmp_path):
    """Every key a run writes, and every per-rank key, is in docs/training.md's summary tables."""
    s = T.train(run_cfg(tmp_path, "k", "train.max_steps=1"))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    table = doc[doc.index("## summary.json"):]
    keys = set(s) | set(s["per_rank"][0])
    missing = sorted(k for k in keys if f"`{k}`" not in table)
    assert not missing, missing
