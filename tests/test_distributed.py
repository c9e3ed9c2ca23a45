"""Distributed training with real processes: torchrun, gloo, 2 ranks on the CPU.

Every strategy must optimise the same objective as one process with the same global batch:
from the same initial weights and data, the per-step losses agree to 1e-4 (fp32).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distrib_gpt.config import load_config
from distrib_gpt.data import BatchLoader, TokenizedSplit, prepare_data
from distrib_gpt.train import train
sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from tiny_run import tiny_run  # noqa: E402


STEPS = 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dist_cache")


def overrides(cache: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_run(cache, out, name, "train.epochs=1", f"train.max_steps={STEPS}", "eval.train_subset_batches=4", *extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "distrib_gpt.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
    """The reference: one process, micro-batch 8 = 2 ranks x 4."""
    out = tmp_path_factory.mktemp("single")
    train(load_config(None, overrides(cache, out, "ref", "train.micro_batch_size=8")))
    return out / "ref"


def assert_close_curves(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "fsdp_full", "fsdp_grad_op", "hsdp"])
def test_strategy_matches_single_process(strategy, single, cache, tmp_path):
    r = torchrun(overrides(cache, tmp_path, strategy, f"parallel.strategy={strategy}", "train.micro_batch_size=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / strategy
    assert_close_curves(losses(run), losses(single), 1e-4)
    s = json.loads((run / "summary.json").read_text())
    ref = json.loads((single / "summary.json").read_text())
    assert s["world_size"] == 2 and s["strategy"] == strategy and s["global_batch_sequences"] == 8
    assert s["real_tokens"] == ref["real_tokens"]  # the two ranks together saw the same tokens
    assert s["supervised_tokens"] == ref["supervised_tokens"]
    assert len(s["per_rank"]) == 2 and {p["rank"] for p in s["per_rank"]} == {0, 1}
    assert s["tokens_per_s"] > 0 and s["comm_bytes_per_step"] > 0
    if strategy in ("ddp", "zero1"):
        # measured by the DDP comm hook: the fp32 gradient of every parameter goes into one
        # all-reduce per step; a ring all-reduce over 2 ranks sends 2 (W-1)/W = 1x of it
        grads = s["trainable_params"] * 4
        zero1_broadcast = s["params"] * 4 / 2 if strategy == "zero1" else 0  # (W-1)/W of the fp32 weights
        assert s["comm_bytes_per_step"] == grads + zero1_broadcast
    for a, b in zip(s["val_loss_by_epoch"], ref["val_loss_by_epoch"]):
        assert a == pytest.approx(b, rel=1e-4)
    # the consolidated checkpoint holds plain keys and the full (unsharded) tensors
    from distrib_gpt.checkpoint import load_consolidated

    model = load_consolidated(run / "checkpoint")
    assert model.transformer.wte.weight.shape[0] == 50304
    assert len((run / "metrics.jsonl").read_text().splitlines()) == STEPS  # rank 0 is the only writer


def test_grad_accumulation_matches_bigger_micro_batch(single, cache, tmp_path):
    # 2 ranks x micro 1 x accum 4 = global 8, like the single process's micro 8
    r = torchrun(overrides(cache, tmp_path, "acc", "parallel.strategy=ddp", "train.micro_batch_size=1", "train.grad_accum=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close_curves(losses(tmp_path / "acc"), losses(single), 1e-4)


def test_activation_checkpointing_same_losses(single, cache, tmp_path):
    r = torchrun(overrides(cache, tmp_path, "ac", "parallel.strategy=fsdp_full", "train.micro_batch_size=4",
                           "parallel.activation_checkpointing=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close_curves(losses(tmp_path / "ac"), losses(single), 1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_under_fsdp_tracks_single(precision, cache, tmp_path):
    """bf16/fp16 (FSDP2 MixedPrecisionPolicy + autocast; fp16 with the sharded scaler) stay
    within 2% of the same policy in one process: rounding differs, the objective doesn't."""
    ref_dir = tmp_path / "ref"
    train(load_config(None, overrides(cache, ref_dir, precision, f"precision={precision}", "train.micro_batch_size=8")))
    r = torchrun(overrides(cache, tmp_path, precision, f"precision={precision}", "parallel.strategy=fsdp_full",
                           "train.micro_batch_size=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close_curves(losses(tmp_path / precision), losses(ref_dir / precision), 2e-2)
    s = json.loads((tmp_path / precision / "summary.json").read_text())
    assert s["precision"] == precision and s["skipped_steps"] <= 1


def test_two_nodes_world_size_four(cache, tmp_path):
    """Two agents of launch/torchrun.sh (NNODES=2, c10d rendezvous on 127.0.0.1), 2 workers
    each: the README's multi-node command, with both "nodes" on this machine."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, NNODES="2", NPROC_PER_NODE="2",
               RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="two-nodes-test")
    args = overrides(cache, tmp_path, "two_nodes", "parallel.strategy=hsdp", "train.micro_batch_size=2",
                     "train.grad_accum=1")
    cmd = [str(REPO / "launch" / "torchrun.sh"), str(REPO / "configs" / "quickstart.yaml"), *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert f"--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{port} --rdzv-id=two-nodes-test" in outs[0][1]
    s = json.loads((tmp_path / "two_nodes" / "summary.json").read_text())
    assert s["world_size"] == 4 and s["num_nodes"] == 2 and len(s["per_rank"]) == 4
    assert s["global_batch_sequences"] == 8
    assert s["real_tokens"] == sum(p["real_tokens"] for p in s["per_rank"])
    assert s["peak_host_rss_bytes"] == max(p["peak_host_rss_bytes"] for p in s["per_rank"])


def test_strategy_errors_at_start_up(cache, tmp_path):
    r = torchrun(overrides(cache, tmp_path, "bad", "parallel.strategy=single"))
    assert r.returncode != 0
    assert "parallel.strategy: 'single' runs one process but WORLD_SIZE=2" in r.stderr
    r = torchrun(overrides(cache, tmp_path, "bad", "parallel.strategy=hsdp", "parallel.hsdp_replicas=3"))
    assert r.returncode != 0 and "parallel.hsdp_replicas: 3 replica groups do not divide WORLD_SIZE=2" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_distributed_strategy_without_torchrun_fails(cache, tmp_path):
    from distrib_gpt.config import ConfigError

    with pytest.raises(ConfigError, match="needs a process group"):
        train(load_config(None, overrides(cache, tmp_path, "x", "parallel.strategy=ddp")))


def test_rank_shards_disjoint_cover_and_reshuffle(cache):
    cfg = load_config(None, overrides(cache, cache, "x"))
    split = TokenizedSplit.open(prepare_data(cfg.data, log=lambda *a: None).dir, "train")
    whole = BatchLoader(split, "pack", 64, 2, seed=5)
    ranks = [BatchLoader(split, "pack", 64, 2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    g = whole.global_batches()
    ids = [r.rank_batch_ids() for r in ranks]
    assert len(ids[0]) == len(ids[1]) == -(-g // 2)
    assert set(ids[0]) | set(ids[1]) == set(range(g))
    assert len(set(ids[0]) & set(ids[1])) == (len(ids[0]) * 2 - g)  # only the padding repeats
    # rank r's j-th batch is global batch r + 2j, token for token
    by_gid = {}
    for r, loader in enumerate(ranks):
        for gid, b in zip(ids[r], loader):
            by_gid.setdefault(gid, b.input_ids)
    for gid, b in enumerate(whole):
        assert torch.equal(by_gid[gid], b.input_ids)
    first = torch.cat([b.input_ids for b in ranks[0]])
    ranks[0].set_epoch(1)
    assert not torch.equal(first, torch.cat([b.input_ids for b in ranks[0]]))  # a new epoch reshuffles


def test_failing_rank_brings_the_job_down_with_its_message(cache, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    helper = Path(__file__).parent / "helpers" / "fail_rank.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(helper),
           *overrides(cache, tmp_path, "fail", "parallel.strategy=ddp", "train.micro_batch_size=4", "parallel.timeout_s=60")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    report = r.stderr[r.stderr.index("Root Cause"):]
    assert "rank      : 1" in report and "injected failure on rank 1 at step 2" in report
    assert not (tmp_path / "fail" / "summary.json").exists()


def test_int8_conversion_longer_than_the_collective_timeout(cache, tmp_path):
    """quantize.after_training runs on rank 0 after the process group is shut down, so a
    conversion slower than parallel.timeout_s (here 22 s against 10 s) finishes the job instead
    of timing out rank 1, which used to wait for it in a barrier."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SLOW_QUANTIZE_S="22")
    helper = Path(__file__).parent / "helpers" / "slow_quantize.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(helper),
           *overrides(cache, tmp_path, "q", "parallel.strategy=ddp", "train.micro_batch_size=4", "parallel.timeout_s=10",
                      "quantize.after_training=true", "quantize.measure=false")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "q" / "quant_summary.json").read_text())["quantized_layers"] > 0
