"""FSDP/HSDP set-up (train.build_parallel_model): the model is built on the meta device and
only rank 0 builds real weights, so no other rank ever holds the whole model. With real
processes (torch.multiprocessing spawn, gloo, 2 ranks on the CPU):

- each rank's parameters are its half of the model (up to FSDP's dim-0 chunking);
- rank 1's peak RSS during the build stays well below the model's bytes, while building the
  whole model grows it by about its bytes (the measurement can see it);
- the weights are the ones a single process starts from, bit for bit: scratch, LoRA, and
  pretrained (a tiny Hugging Face GPT-2 saved locally; nothing is downloaded);
- every rank leaves the build in the single-process RNG state;
- the final full state dict is copied to the host on rank 0 only (DDP and FSDP).
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from distrib_gpt.config import load_config
from distrib_gpt.distributed import DistInfo, init_distributed
from distrib_gpt.parallel import full_state_dict
from distrib_gpt.precision import resolve_precision
from distrib_gpt.train import build_model, build_parallel_model

WORLD = 2
CAN_RESET_PEAK_RSS = Path("/proc/self/clear_refs").exists()
TINY = ["model.name=custom", "model.init=scratch", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "data.seq_len=64", "run.device=cpu"]
# big enough that its 204 MB of fp32 parameters stand out of the RSS noise, small enough to
# build in about a second; half of it is the tied 50304 x 512 embedding, as in GPT-2, so a
# rank that received whole tensors (rather than its chunks) would show it
BIG = ["model.name=custom", "model.init=scratch", "model.n_layer=8", "model.n_head=8", "model.n_embd=512",
       "model.block_size=64", "data.seq_len=64", "run.device=cpu"]


def cases(hf_dir: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (config overrides, strategy) of the builds the 2-rank job runs."""
    pretrained = ["model.name=gpt2", "model.init=pretrained", f"model.pretrained_path={hf_dir}", "data.seq_len=64",
                  "run.device=cpu"]
    return {
        "fsdp_full": (TINY, "fsdp_full"),
        "hsdp": (TINY, "hsdp"),  # one node: one replica group sharded over both ranks
        "hsdp_2x1": ([*TINY, "parallel.hsdp_replicas=2"], "hsdp"),  # two replicas of one shard each
        "lora": ([*TINY, "lora.enabled=true", "lora.rank=4"], "fsdp_full"),
        "pretrained": (pretrained, "fsdp_full"),
        "ddp": (TINY, "ddp"),
    }


def config(overrides: list[str], strategy: str):
    return load_config(None, [*overrides, f"parallel.strategy={strategy}", "parallel.timeout_s=120"])


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters (the tied embedding once): its shards under FSDP."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in local)


def expected_shard_bytes(model: torch.nn.Module, rank: int, shards: int) -> int:
    """FSDP2 cuts every tensor on dim 0 into chunks of ceil(dim0 / S) rows; rank r keeps
    rows [r·c, (r+1)·c), the last rank(s) fewer (or none)."""
    total = 0
    for p in model.parameters():
        rows = p.shape[0]
        c = math.ceil(rows / shards)
        mine = max(0, min((rank + 1) * c, rows) - rank * c)
        total += mine * (p.numel() // rows) * p.element_size()
    return total


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_growth(fn) -> tuple[object, int]:
    """(fn(), bytes by which this process's peak RSS rose above its RSS at the call)."""
    before = rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    out = fn()
    return out, (rss_kb("VmHWM") - before) * 1024


def build(cfg, info, device):
    return build_parallel_model(cfg, resolve_precision(cfg.precision, device), info, device, log=lambda *a: None)


# ----------------------------------------------------------------------------- the workers


def _worker(rank: int, port: int, builds: list[tuple[str, list[str], str]], out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info, device = init_distributed("cpu", 120)
    results = {}
    for name, overrides, strategy in builds:
        cfg = config(overrides, strategy)
        dist.barrier()  # the ranks start each build together
        if name == "rss":
            par, grew = peak_rss_growth(lambda: build(cfg, info, device))
            shard = param_bytes(par.model)
            del par
            full, grew_full = peak_rss_growth(lambda: build_model(cfg))
            results[name] = dict(grew=grew, shard=shard, grew_full=grew_full, full=param_bytes(full))
            del full
            continue
        par = build(cfg, info, device)
        if strategy == "ddp":  # only the final state dict, which train.py saves from rank 0
            results[name] = dict(final=full_state_dict(par))
            continue
        after = torch.rand(4)  # the RNG state the build left behind
        model = par.model
        tied = model.lm_head.weight is model.transformer.wte.weight
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        results[name] = dict(bytes=param_bytes(model), tied=tied, rng=after, state=state if rank == 0 else None,
                             final_keys=len(full_state_dict(par)))
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, builds) -> list[dict]:
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned children inherit it
    try:
        mp.start_processes(_worker, args=(free_port(), builds, tmp_path), nprocs=WORLD, start_method="spawn")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(overrides: list[str]):
    """What one process starts from: its model, and the RNG state it leaves behind."""
    cfg = config(overrides, "single")
    par = build(cfg, DistInfo(), torch.device("cpu"))
    return par.model, torch.rand(4)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny_hf_gpt2")
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, hf_dir):
    """One 2-rank job that runs every build, in order (each spawn costs seconds)."""
    builds = [(name, *case) for name, case in cases(hf_dir).items()]
    if CAN_RESET_PEAK_RSS:
        builds.append(("rss", BIG, "fsdp_full"))  # last: the first builds pay for imports and lazy set-up
    return run_ranks(tmp_path_factory.mktemp("fsdp_init"), builds)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", ["fsdp_full", "hsdp"])
def test_each_rank_holds_half_of_the_parameters(ranks, case):
    ref, _ = single_process(TINY)
    full = param_bytes(ref)
    for rank, res in enumerate(ranks):
        assert res[case]["bytes"] == expected_shard_bytes(ref, rank, WORLD)
        assert abs(res[case]["bytes"] - full / WORLD) <= 0.01 * full  # the chunking moves a few rows
    assert sum(res[case]["bytes"] for res in ranks) == full
    assert all(res[case]["tied"] for res in ranks)  # lm_head.weight is still wte.weight


def test_hsdp_replicas_each_hold_the_whole_model(ranks):
    ref, _ = single_process(TINY)
    assert [res["hsdp_2x1"]["bytes"] for res in ranks] == [param_bytes(ref)] * WORLD


@pytest.mark.skipif(not CAN_RESET_PEAK_RSS, reason="needs Linux's /proc/self/clear_refs")
def test_rank1_never_holds_the_whole_model(ranks):
    r = ranks[1]["rss"]
    full = r["full"]
    assert full > 200e6
    # the reference: building the whole model does show up, as at least its bytes (GPT()
    # briefly holds the LM head's own weight before tying it to the embedding: up to 1.5x)
    assert 0.9 * full <= r["grew_full"] <= 1.6 * full, r
    # the sharded build: this rank's half, plus one chunk in flight (measured: 0.47 x the
    # model; receiving whole tensors, as set_model_state_dict(broadcast_from_rank0) does: 1.03 x)
    assert r["shard"] == pytest.approx(full / 2, rel=0.01)
    assert r["grew"] <= 0.7 * full, r


@pytest.mark.parametrize("case", ["fsdp_full", "hsdp", "hsdp_2x1", "lora", "pretrained"])
def test_weights_and_rng_equal_a_single_process(ranks, case, hf_dir):
    ref, rng = single_process(cases(hf_dir)[case][0])
    want = ref.state_dict()
    got = ranks[0][case]["state"]
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    if case == "lora":
        assert any(k.endswith("lora_A") for k in got) and not want["transformer.h.0.attn.c_attn.lora_B"].any()
    if case == "pretrained":  # the HF weights, not a random init
        import transformers

        hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).state_dict()
        assert torch.equal(got["transformer.wpe.weight"], hf["transformer.wpe.weight"])
    for res in ranks:
        assert torch.equal(res[case]["rng"], rng)


def test_only_rank0_copies_the_final_state_dict(ranks):
    """The consolidated save reads the full state dict on rank 0 only: other ranks get {}
    (DDP: no host copy of the whole model on every rank; FSDP: torch's cpu_offload)."""
    final = ranks[0]["ddp"]["final"]
    single, _ = single_process(TINY)
    assert final.keys() == single.state_dict().keys()
    assert all(torch.equal(final[k], v) for k, v in single.state_dict().items())
    assert ranks[1]["ddp"]["final"] == {}
    for case in ("fsdp_full", "hsdp"):
        assert ranks[0][case]["final_keys"] == len(final) and ranks[1][case]["final_keys"] == 0
