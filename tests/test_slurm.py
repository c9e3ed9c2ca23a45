"""The real `launch/*.sbatch` scripts, submitted to a real single-node SLURM cluster.

tests/helpers/slurm_cluster.py starts munged, slurmctld and slurmd under a temporary
directory (root and Debian's slurm packages needed: `.ci/run` installs them and sets
DISTRIB_GPT_REQUIRE_SLURM=1 so that a missing SLURM fails CI instead of skipping). The node
has 2 CPUs and two stand-in GPUs; jobs train a tiny model on the CPU with gloo, 2 ranks.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from slurm_cluster import SlurmCluster, missing_binaries  # noqa: E402 (after the sys.path line)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIG = REPO / "configs" / "quickstart.yaml"

pytestmark = pytest.mark.slurm


def _skip_or_fail_without_slurm() -> None:
    missing = missing_binaries()
    problem = f"SLURM binaries missing: {', '.join(missing)}" if missing else None
    if problem is None and os.geteuid() != 0:
        problem = "the SLURM test cluster needs root (slurmd runs jobs as root here)"
    if problem:
        if os.environ.get("DISTRIB_GPT_REQUIRE_SLURM") == "1":
            pytest.fail(problem + " (DISTRIB_GPT_REQUIRE_SLURM=1)")
        pytest.skip(problem + "; install slurmctld slurmd slurm-client munge (see .ci/run)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _skip_or_fail_without_slurm()
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-work")


def tiny(work: Path, *extra: str) -> list[str]:
    """Overrides that make the quickstart config a few-second CPU job."""
    return [
        "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
        "data.seq_len=64", "data.max_examples=96", f"data.cache_dir={work / 'cache'}",
        f"run.out_dir={work / 'runs'}", "run.device=cpu", "train.epochs=1", "train.micro_batch_size=4",
        "train.grad_accum=1", "train.progress=false", "train.log_every=1", "optim.warmup_steps=1",
        "eval.train_subset_batches=2", "eval.val_batches=2", *extra,
    ]


def sbatch(cluster: SlurmCluster, work: Path, script: str, sbatch_opts: list[str], args: list[str],
           env: dict[str, str] | None = None, wait: bool = True, timeout: float = 300, log: str = "%x-%j.out") -> int:
    """Submit launch/<script> as a user would (from the repository root); return the job id.
    Only the log's directory differs from the script's own --output (the test's tmp dir)."""
    cmd = ["sbatch", "--parsable", f"--output={work}/{log}", *(["--wait"] if wait else []), *sbatch_opts,
           str(LAUNCH / script), str(CONFIG), *args]
    p = cluster.run(*cmd, check=False, timeout=timeout, cwd=str(REPO),
                    env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})})
    job_id = p.stdout.strip().split(";")[0]
    if p.returncode != 0:
        logs = "\n".join(f"--- {f.name} ---\n{f.read_text()[-3000:]}" for f in sorted(work.glob("*.out")))
        pytest.fail(f"sbatch {script} exited {p.returncode}: {p.stderr}\n{logs}\n{cluster.logs()}")
    return int(job_id)


def summary(work: Path, run_name: str) -> dict:
    return json.loads((work / "runs" / run_name / "summary.json").read_text())


def test_single_node_script_runs_ddp_on_the_gpus_slurm_gives(cluster, work):
    job = sbatch(cluster, work, "slurm_single_node.sbatch", ["--gpus-per-node=2"], tiny(work, "parallel.strategy=ddp"))
    s = summary(work, f"distrib-gpt-{job}")
    assert s["world_size"] == 2 and s["num_nodes"] == 1 and s["strategy"] == "ddp"
    assert s["launch"]["slurm_job_id"] == str(job)
    assert s["epochs_completed"] == 1 and s["resumed_from_step"] is None
    log = (work / f"distrib-gpt-{job}.out").read_text()
    # the script prints the resolved command: torchrun, 2 workers (SLURM's GPU count), the overrides
    assert re.search(r"^\+ \S*python\S* -m torch\.distributed\.run --nnodes=1 --nproc-per-node=2 .*--standalone", log, re.MULTILINE)
    assert f"run.name=distrib-gpt-{job} resume=auto" in log and "parallel.strategy=ddp" in log


def test_multi_node_script_starts_one_agent_per_task_with_c10d_rendezvous(cluster, work):
    # Two SLURM tasks on the one node stand in for two nodes: each task is a torchrun agent
    # with one worker, and they meet at the rendezvous on the first host of the allocation.
    job = sbatch(cluster, work, "slurm_multi_node.sbatch", ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2"],
                 tiny(work, "parallel.strategy=fsdp_full"), env={"NPROC_PER_NODE": "1"})
    s = summary(work, f"distrib-gpt-{job}")
    assert s["world_size"] == 2 and s["num_nodes"] == 2 and s["strategy"] == "fsdp_full"
    log = (work / f"distrib-gpt-{job}.out").read_text()
    port = 20000 + job % 20000
    assert f"rendezvous localhost:{port}" in log
    assert log.count(f"--rdzv-backend=c10d --rdzv-endpoint=localhost:{port} --rdzv-id={job}") == 2  # each agent printed it


def test_precision_sweep_array_runs_every_policy(cluster, work):
    job = sbatch(cluster, work, "slurm_precision_sweep.sbatch", [], tiny(work), log="%x-%A_%a.out")
    got = {}
    for precision in ("fp32", "tf32", "fp16", "bf16"):
        s = summary(work, f"distrib-gpt-sweep-{job}-{precision}")
        got[precision] = s["precision_requested"]
        assert s["launch"]["slurm_array_job_id"] == str(job)
        assert s["world_size"] == 1 and len(s["train_loss_by_epoch"]) == 2  # before training + 1 epoch
    assert got == {"fp32": "fp32", "tf32": "tf32", "fp16": "fp16", "bf16": "bf16"}
    logs = sorted(work.glob(f"distrib-gpt-sweep-{job}_*.out"))
    assert [p.name for p in logs] == [f"distrib-gpt-sweep-{job}_{i}.out" for i in range(4)]


def test_requeued_job_resumes_from_its_latest_checkpoint(cluster, work):
    args = tiny(work, "parallel.strategy=ddp", "data.max_examples=400",
                "checkpoint.every_steps=5", "model.n_embd=128", "model.n_layer=4", "model.n_head=4")
    job = sbatch(cluster, work, "slurm_single_node.sbatch", ["--gpus-per-node=2"], args, wait=False)
    run_dir = work / "runs" / f"distrib-gpt-{job}"
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert time.monotonic() < deadline, f"no checkpoint after 240 s\n{cluster.logs()}"
        time.sleep(0.2)
    cluster.run("scontrol", "requeue", str(job))  # what preemption or a node failure does
    deadline = time.monotonic() + 300
    while cluster.run("squeue", "-h", "-j", str(job), check=False).stdout.strip():
        assert time.monotonic() < deadline, f"requeued job {job} did not finish\n{cluster.logs()}"
        time.sleep(1)
    s = summary(work, f"distrib-gpt-{job}")
    assert s["launch"]["slurm_restart_count"] == "1"
    assert s["epochs_completed"] == 1 and s["steps"] > 5
    assert s["resumed_from_step"] is not None and 0 < s["resumed_from_step"] < s["steps"]
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, s["steps"] + 1))  # each step once: the resumed curve has no repeats
    log = (work / f"distrib-gpt-{job}.out").read_text()  # --open-mode=append keeps both attempts
    assert "restart 0" in log and "restart 1" in log and "resuming from" in log


def test_scripts_refuse_a_missing_config(cluster, work):
    p = cluster.run("sbatch", "--parsable", "--wait", "--gpus-per-node=2", f"--output={work}/bad-%j.out",
                    str(LAUNCH / "slurm_single_node.sbatch"), str(work / "nope.yaml"), check=False, cwd=str(REPO), timeout=120)
    job = p.stdout.strip()
    assert job.isdigit(), f"not submitted: {p.stderr}"
    assert p.returncode == 2  # sbatch --wait returns the job's exit code
    assert "config file not found" in (work / f"bad-{job}.out").read_text()

