"""Sharded checkpoints and exact resume, with real processes (torchrun, gloo, 2 ranks)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distrib_gpt import train as T
from distrib_gpt.checkpoint import CheckpointError, load_any
from distrib_gpt.config import load_config

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from tiny_run import tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_cache")


def overrides(cache: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_run(cache, out, name, "train.epochs=2", "checkpoint.every_steps=2", *extra)


def torchrun(args: list[str], script: str | None = None, nproc: int = 2, extra_env=None, restarts: int = 0):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    target = [str(HELPERS / script)] if script else ["-m", "distrib_gpt.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", *target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metric_steps(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """An uninterrupted 2-rank DDP run (2 epochs, a checkpoint every 2 steps)."""
    out = tmp_path_factory.mktemp("ref")
    r = torchrun(overrides(cache, out, "ref", "parallel.strategy=ddp", "train.micro_batch_size=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "ref"


def test_interrupted_run_resumes_to_the_same_weights(reference, cache, tmp_path):
    args = overrides(cache, tmp_path, "cut", "parallel.strategy=ddp", "train.micro_batch_size=4", "resume=auto")
    r = torchrun(args, script="kill_rank.py", extra_env={"KILL_AT_STEP": "4"})
    assert r.returncode != 0  # rank 1 was killed before step 4, after the step-2 checkpoint
    run = tmp_path / "cut"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (run / "summary.json").exists()

    r = torchrun(args)  # the same command again: resume=auto continues from latest
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(weights(run), weights(reference)) <= 1e-6
    # the loss curve continues without a jump or a repeated step
    steps = metric_steps(run)
    assert [m["step"] for m in steps] == [m["step"] for m in metric_steps(reference)]
    for a, b in zip(steps, metric_steps(reference)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    s, ref = json.loads((run / "summary.json").read_text()), json.loads((reference / "summary.json").read_text())
    assert s["train_loss_by_epoch"] == pytest.approx(ref["train_loss_by_epoch"], rel=1e-5)
    assert s["supervised_tokens"] == ref["supervised_tokens"] and s["real_tokens"] == ref["real_tokens"]
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    du = subprocess.run(["du", "-s", "--apparent-size", "-B1", str(latest)], capture_output=True, text=True, check=True)
    assert s["sharded_checkpoint_bytes"] == int(du.stdout.split()[0])
    assert s["checkpoint_bytes"] > 0
    # per-step figures cover this attempt's steps only (it ran steps 3.., not 1..)
    assert s["resumed_from_step"] == 2
    assert s["comm_bytes_per_step"] == ref["comm_bytes_per_step"] == s["trainable_params"] * 4


def test_elastic_restart_after_kill_9(reference, cache, tmp_path):
    args = overrides(cache, tmp_path, "elastic", "parallel.strategy=ddp", "train.micro_batch_size=4", "resume=auto")
    r = torchrun(args, script="kill_rank.py", extra_env={"KILL_AT_STEP": "5"}, restarts=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(weights(tmp_path / "elastic"), weights(reference)) <= 1e-6


@pytest.mark.parametrize("target", ["single", "ddp"])
def test_fsdp_checkpoint_reshards(cache, tmp_path, target):
    """Saved by FSDP on 2 ranks; resumed by 1 process (micro 8) or by DDP on 2 ranks; the
    next losses match the 2-rank FSDP continuation."""
    src = overrides(cache, tmp_path, "fsdp", "parallel.strategy=fsdp_full", "train.micro_batch_size=4",
                    "train.epochs=1", "train.max_steps=4")
    r = torchrun(src)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_00000002"
    assert (ckpt / "trainer_state.json").is_file()
    common = overrides(cache, tmp_path, f"to_{target}", "train.epochs=1", "train.max_steps=4", f"resume={ckpt}")
    if target == "single":
        T.train(load_config(None, common + ["train.micro_batch_size=8"]))
    else:
        r = torchrun(common + ["parallel.strategy=ddp", "train.micro_batch_size=4"])
        assert r.returncode == 0, r.stderr[-3000:]
    cont = [m for m in metric_steps(tmp_path / "fsdp") if m["step"] > 2]
    mine = [m for m in metric_steps(tmp_path / f"to_{target}") if m["step"] > 2]
    assert [m["step"] for m in mine] == [3, 4]
    for a, b in zip(mine, cont):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_save_killed_halfway_leaves_latest_loadable(cache, tmp_path, monkeypatch):
    import distrib_gpt.checkpoint as C

    saves = {"n": 0}
    real_save_file = C.save_file

    def crash_on_second_save(tensors, filename, *a, **k):
        if "rng_rank" in str(filename):
            saves["n"] += 1
            if saves["n"] == 2:  # the shards of the 2nd checkpoint are written; it is not published
                raise KeyboardInterrupt("killed mid-save")
        return real_save_file(tensors, filename, *a, **k)

    monkeypatch.setattr(C, "save_file", crash_on_second_save)
    args = overrides(cache, tmp_path, "half", "train.micro_batch_size=8", "resume=auto")
    with pytest.raises(KeyboardInterrupt):
        T.train(load_config(None, args))
    ckpts = tmp_path / "half" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert (ckpts / ".tmp-step_00000004").is_dir()  # the partial save
    assert load_any(ckpts / "step_00000002").config.n_embd == 32

    monkeypatch.setattr(C, "save_file", real_save_file)
    summary = T.train(load_config(None, args))  # resumes from step 2 and cleans the partial save
    assert summary["steps"] > 4 and not (ckpts / ".tmp-step_00000004").exists()


def test_checkpoint_of_another_shape_fails_naming_the_file(cache, tmp_path):
    T.train(load_config(None, overrides(cache, tmp_path, "a", "train.micro_batch_size=8", "train.max_steps=3", "train.epochs=1")))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
    bigger = overrides(cache, tmp_path, "b", "train.micro_batch_size=8", "model.n_embd=64", f"resume={ckpt}")
    with pytest.raises(CheckpointError, match="step_00000002"):
        T.train(load_config(None, bigger))


def test_truncated_shard_fails_naming_the_file(cache, tmp_path):
    T.train(load_config(None, overrides(cache, tmp_path, "t", "train.micro_batch_size=8", "train.max_steps=3", "train.epochs=1")))
    ckpt = tmp_path / "t" / "checkpoints" / "step_00000002"
    meta = ckpt / ".metadata"
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        load_any(ckpt)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_malicious_pickle_is_refused_and_never_runs(cache, tmp_path, monkeypatch):
    T.train(load_config(None, overrides(cache, tmp_path, "m", "train.micro_batch_size=8", "train.max_steps=3", "train.epochs=1")))
    good = tmp_path / "m" / "checkpoints" / "step_00000002"
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    (evil / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="refused"):
        load_any(evil)
    assert not marker.exists()
    # a pickle where safetensors are expected is refused too
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(pickle.dumps(_Evil()))
    (fake / "config.json").write_text((tmp_path / "m" / "checkpoint" / "config.json").read_text())
    with pytest.raises(CheckpointError):
        load_any(fake)
    assert not marker.exists()


def test_export_hf_matches_our_logits(cache, tmp_path):
    import transformers
    T.train(load_config(None, overrides(cache, tmp_path, "e", "train.micro_batch_size=8", "train.max_steps=3", "train.epochs=1")))
    x = torch.randint(0, 50257, (2, 32))
    for source in (tmp_path / "e" / "checkpoint", tmp_path / "e" / "checkpoints" / "step_00000002"):
        out = tmp_path / f"hf_{source.name}"
        r = subprocess.run([sys.executable, "-m", "distrib_gpt", "export-hf", "--checkpoint", str(source), "--out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        ours = load_any(source).eval()
        hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        with torch.no_grad():
            diff = (ours(x) - hf(x).logits).abs().max().item()
        assert diff <= 1e-4


def test_zero1_resumes_to_the_same_weights(cache, tmp_path):
    ref = overrides(cache, tmp_path, "zref", "parallel.strategy=zero1", "train.micro_batch_size=4")
    assert torchrun(ref).returncode == 0
    args = overrides(cache, tmp_path, "zcut", "parallel.strategy=zero1", "train.micro_batch_size=4", "resume=auto")
    assert torchrun(args, script="kill_rank.py", extra_env={"KILL_AT_STEP": "4"}).returncode != 0
    r = torchrun(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(weights(tmp_path / "zcut"), weights(tmp_path / "zref")) <= 1e-6


def test_checkpoint_of_the_old_stream_packing_is_not_resumed(cache, tmp_path):
    """A `pack` checkpoint from before document-masked packing (batch plan 1, no
    `batch_plan` in its state) cannot replay its remaining batches: resume refuses it."""
    from distrib_gpt.config import ConfigError

    T.train(load_config(None, overrides(cache, tmp_path, "old", "train.micro_batch_size=8", "train.max_steps=3", "train.epochs=1")))
    ckpt = tmp_path / "old" / "checkpoints" / "step_00000002"
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["batching"] == "pack" and state["batch_plan"] == 2
    del state["batch_plan"]
    state_file.write_text(json.dumps(state))
    again = overrides(cache, tmp_path, "new", "train.micro_batch_size=8", "train.epochs=1", f"resume={ckpt}")
    with pytest.raises(ConfigError, match="batch plan 1 .* whole examples .*start a new run"):
        T.train(load_config(None, again))
