"""End-to-end training on CPU: every precision policy, accumulation, non-finite handling, outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distrib_gpt import train as T
from distrib_gpt.config import ConfigError, load_config
from distrib_gpt.data import BatchLoader, TokenizedSplit, prepare_data
from distrib_gpt.model import GPT, GPTConfig
from distrib_gpt.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[1]

SUMMARY_KEYS = {
    "precision", "strategy", "world_size", "device", "params", "trainable_params", "tokens_per_s",
    "epoch_time_s", "mean_epoch_time_s", "peak_gpu_mem_bytes", "peak_gpu_reserved_bytes",
    "peak_host_rss_bytes", "checkpoint_bytes", "train_loss_by_epoch", "val_loss_by_epoch", "mfu",
    "padding_fraction",
}


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for a model and data set small enough for seconds-long CPU runs."""
    return [
        "model.name=custom", "model.init=scratch", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "data.source=bundled", "data.max_examples=60", "data.seq_len=64",
        f"data.cache_dir={tmp_path / 'cache'}", f"run.out_dir={tmp_path / 'runs'}", "run.device=cpu",
        "train.epochs=3", "train.micro_batch_size=4", "train.progress=false", "train.log_every=2",
        "optim.lr=3e-3", "optim.warmup_steps=2", "eval.train_subset_batches=4", "eval.val_batches=4",
        *extra,
    ]


@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16", "auto"])
def test_each_precision_trains_end_to_end(tmp_path, precision):
    cfg = load_config(None, tiny(tmp_path, f"precision={precision}", f"run.name={precision}"))
    summary = T.train(cfg)
    run_dir = tmp_path / "runs" / precision

    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["precision"] == {"auto": "bf16"}.get(precision, precision)
    assert on_disk["strategy"] == "single" and on_disk["world_size"] == 1 and on_disk["device"] == "cpu"
    assert len(on_disk["train_loss_by_epoch"]) == 4 and len(on_disk["val_loss_by_epoch"]) == 4
    assert len(on_disk["epoch_time_s"]) == 3 and all(t > 0 for t in on_disk["epoch_time_s"])
    losses = on_disk["train_loss_by_epoch"]
    assert losses[0] > 10.0  # random init over a 50k vocabulary: about ln(50257) = 10.8
    assert losses[-1] < losses[0] - 1.0, losses
    assert on_disk["val_loss_by_epoch"][-1] < on_disk["val_loss_by_epoch"][0]
    assert on_disk["tokens_per_s"] > 0
    assert on_disk["peak_gpu_mem_bytes"] is None and on_disk["mfu_peak_source"] == "measured" and 0 < on_disk["mfu"] < 1
    assert on_disk["peak_host_rss_bytes"] > 50 * 2**20
    assert on_disk["params"] == on_disk["trainable_params"] > 0
    assert on_disk["padding_fraction"] < 0.1  # whole examples a row; at seq_len 64 many fill one alone (7%)
    ckpt = run_dir / "checkpoint"
    assert on_disk["checkpoint_bytes"] == ckpt.stat().st_size + sum(p.stat().st_size for p in ckpt.iterdir())
    if precision == "tf32":
        assert "fp32" in on_disk["precision_note"]

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and lines[-1]["step"] == on_disk["steps"]
    for rec in lines:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s"} <= set(rec)
    assert load_config(run_dir / "config.yaml") == cfg


def _one_batch(tmp_path, batch_size=8):
    cfg = load_config(None, tiny(tmp_path, "data.batching=pad"))
    prepared = prepare_data(cfg.data, log=lambda *a: None)
    split = TokenizedSplit.open(prepared.dir, "train")
    loader = BatchLoader(split, "pad", 64, batch_size, seed=0)
    loader.set_epoch(0)
    return next(iter(loader))


def _split(batch, n):
    """Cut a batch into n micro-batches of equal rows (supervised counts differ between them)."""
    rows = batch.input_ids.shape[0] // n
    out = []
    for i in range(n):
        sl = slice(i * rows, (i + 1) * rows)
        x, y = batch.input_ids[sl], batch.labels[sl]
        out.append(
            type(batch)(input_ids=x, labels=y, n_real_tokens=int(x.numel()), n_supervised=int((y != -100).sum()), n_pad=0)
        )
    return out


def _sgd_delta(model_state, micro_batches):
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    model.load_state_dict(model_state)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = resolve_precision("fp32", torch.device("cpu"))
    r = T.train_step(model, micro_batches, opt, policy, None, 0.0, torch.device("cpu"))
    return r, {k: before[k] - v for k, v in model.state_dict().items()}


def test_accumulation_equals_one_big_batch(tmp_path):
    batch = _one_batch(tmp_path)
    torch.manual_seed(0)
    state = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).state_dict()
    micro = _split(batch, 4)
    counts = [m.n_supervised for m in micro]
    assert len(set(counts)) > 1, "the test needs micro-batches with different supervised counts"

    big, d_big = _sgd_delta(state, [batch])
    acc, d_acc = _sgd_delta(state, micro)
    assert acc.supervised_tokens == big.supervised_tokens == batch.n_supervised
    assert acc.loss == pytest.approx(big.loss, rel=1e-5)
    for k in d_big:
        torch.testing.assert_close(d_acc[k], d_big[k], rtol=1e-4, atol=1e-6)

    # the naive alternative (mean of per-micro-batch means) gives a different loss here, so the
    # assertion above could fail
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    model.load_state_dict(state)
    with torch.no_grad():
        naive = sum(model(m.input_ids, m.labels)[1].item() for m in micro) / len(micro)
    assert abs(naive - big.loss) > 1e-3


def test_fp16_overflow_step_is_skipped_and_counted(tmp_path):
    batch = _one_batch(tmp_path, batch_size=4)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    policy = resolve_precision("fp16", torch.device("cpu"))
    scaler = policy.make_grad_scaler()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = model.transformer.ln_f.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    scale = scaler.get_scale()
    r = T.train_step(model, [batch], opt, policy, scaler, 1.0, torch.device("cpu"))
    handle.remove()
    assert r.skipped and scaler.get_scale() < scale
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    r = T.train_step(model, [batch], opt, policy, scaler, 1.0, torch.device("cpu"))
    assert not r.skipped


def test_consecutive_nonfinite_losses_stop_training(tmp_path, monkeypatch):
    original = GPT.forward

    def nan_loss(self, idx, targets=None, **kw):
        out = original(self, idx, targets, **kw)
        if targets is not None and self.training:
            return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", nan_loss)
    cfg = load_config(None, tiny(tmp_path, "train.max_nonfinite_steps=3", "run.name=nan"))
    with pytest.raises(T.TrainingError, match="3 consecutive steps"):
        T.train(cfg)
    assert not (tmp_path / "runs" / "nan" / "summary.json").exists()


def test_max_steps_and_grad_accum(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "train.max_steps=5", "train.grad_accum=3", "run.name=ms"))
    s = T.train(cfg)
    # 9 micro-batches per epoch here: 3 steps per epoch, so step 5 ends inside epoch 2
    assert s["steps"] == 5 and s["epochs_completed"] == 2 and s["last_epoch_partial"]
    assert s["global_batch_sequences"] == 12
    assert len(s["train_loss_by_epoch"]) == 3


def test_existing_run_dir_is_not_clobbered(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "train.max_steps=1", "run.name=same"))
    T.train(cfg)
    with pytest.raises(ConfigError, match="run.name"):
        T.train(cfg)
    cfg = load_config(None, tiny(tmp_path, "train.max_steps=1", "run.name=same", "run.overwrite=true"))
    T.train(cfg)


def test_tensorboard_events_written(tmp_path):
    import tensorboard  # noqa: F401  (in the dev extra, which the test command installs)
    cfg = load_config(None, tiny(tmp_path, "train.max_steps=2", "metrics.tensorboard=true", "run.name=tb"))
    T.train(cfg)
    assert list((tmp_path / "runs" / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_pretrained_init_from_local_dir(tmp_path):
    import transformers
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    extra = [o for o in tiny(tmp_path) if not o.startswith(("model.", "train.epochs"))]
    cfg = load_config(None, extra + ["model.init=pretrained", f"model.pretrained_path={tmp_path / 'hf'}", "train.epochs=1", "run.name=pt"])
    s = T.train(cfg)
    assert s["params"] == sum(p.numel() for p in hf.parameters()) + (50304 - 50257) * 32
    assert s["train_loss_by_epoch"][1] < s["train_loss_by_epoch"][0]


def test_module_entry_point_runs(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "distrib_gpt.train", "--config", str(ROOT / "configs/quickstart.yaml"),
         *tiny(tmp_path, "train.max_steps=2", "run.name=cli")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary["steps"] == 2
    resolved = yaml.safe_load((tmp_path / "runs" / "cli" / "config.yaml").read_text())
    assert resolved["model"]["n_embd"] == 32 and resolved["run"]["name"] == "cli"


@pytest.mark.slow
def test_compile_per_block_same_losses(tmp_path):
    """torch.compile of each block (inductor on CPU: tens of seconds to compile) changes speed,
    not the math: the loss curve matches the eager run."""
    eager = T.train(load_config(None, tiny(tmp_path, "train.max_steps=4", "run.name=eager")))
    compiled = T.train(load_config(None, tiny(tmp_path, "train.max_steps=4", "run.name=compiled", "parallel.compile=true")))
    for a, b in zip(compiled["train_loss_by_epoch"], eager["train_loss_by_epoch"]):
        assert a == pytest.approx(b, rel=1e-4)
