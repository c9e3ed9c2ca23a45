"""LoRA (distrib_gpt/lora.py): exact at init, merges exactly, trains only the adapters (and so
keeps optimizer state in proportion), resumes from adapter-only checkpoints, and trains the
same under DDP and FSDP2 (with activation checkpointing) on 2 CPU ranks as in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distrib_gpt.checkpoint import CheckpointError, load_any, load_consolidated, load_sharded_model
from distrib_gpt.config import ConfigError, LoRAConfig, load_config
from distrib_gpt.lora import LoRALinear, apply_lora, merge_into, merge_state_dict, trainable_summary
from distrib_gpt.metrics import dir_bytes
from distrib_gpt.model import GPT, GPTConfig
from distrib_gpt.train import train
sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from tiny_run import tiny_run  # noqa: E402


STEPS = 6  # one whole epoch: the last sharded checkpoint (every_epoch) is the final state


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=32, pad_vocab_to=1))


def perturb_adapters(model: GPT) -> None:
    """Give B non-zero values, as training would (at init B = 0 and the update is zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_adapters_start_at_the_base_model_and_freeze_everything_else():
    base, lora = tiny_model(), tiny_model()
    adapted = apply_lora(lora, LoRAConfig(rank=4, targets=["attn.c_attn", "mlp.c_proj"]))
    assert adapted == [f"transformer.h.{i}.{t}" for i in (0, 1) for t in ("attn.c_attn", "mlp.c_proj")]
    idx = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(lora(idx), base(idx), rtol=0, atol=0)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.{ab}" for layer in adapted for ab in ("lora_A", "lora_B")}
    n_trainable, total = trainable_summary(lora)
    assert n_trainable == 2 * (4 * 32 + 96 * 4) + 2 * (4 * 128 + 32 * 4)  # r x in + out x r per layer
    assert total == sum(p.numel() for p in base.parameters()) + n_trainable
    # the base weights are the same Parameters' values, under the same names
    assert {k for k in lora.state_dict() if "lora_" not in k} == set(base.state_dict())


def test_merged_and_unmerged_models_give_the_same_logits():
    lora = tiny_model()
    cfg = LoRAConfig(rank=4, alpha=8.0)
    apply_lora(lora, cfg)
    perturb_adapters(lora)
    idx = torch.randint(0, 100, (2, 16))
    want = lora(idx)
    plain = tiny_model(seed=5)  # other weights: the merged state dict must overwrite them all
    plain.load_state_dict(merge_state_dict(lora.state_dict(), cfg))
    torch.testing.assert_close(plain(idx), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain(idx), tiny_model()(idx), atol=1e-3)  # the adapters did change the model
    merged = merge_into(lora)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(idx), want, rtol=1e-5, atol=1e-5)


def optimizer_state_bytes(model: GPT) -> int:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    idx = torch.randint(0, 100, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    opt.step()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def test_lora_optimizer_state_shrinks_with_the_trainable_fraction():
    full = tiny_model()
    lora = tiny_model()
    apply_lora(lora, LoRAConfig(rank=2))
    trainable, total = trainable_summary(lora)
    base_params = sum(p.numel() for p in full.parameters())
    full_bytes, lora_bytes = optimizer_state_bytes(full), optimizer_state_bytes(lora)
    assert full_bytes >= 8 * base_params  # AdamW: exp_avg + exp_avg_sq in fp32 per parameter
    # the ratio is the trainable fraction (up to AdamW's per-tensor step counters)
    assert lora_bytes / full_bytes == pytest.approx(trainable / base_params, rel=0.02)
    assert lora_bytes < 0.1 * full_bytes


def test_bad_lora_config_names_the_key():
    with pytest.raises(ConfigError, match=r"lora.targets\[0\]: 'attn.q' is not one of"):
        load_config(None, ["lora.targets=[attn.q]"])
    with pytest.raises(ConfigError, match="lora.rank: must be >= 1"):
        load_config(None, ["lora.rank=0"])


# --------------------------------------------------------------------- training runs


def overrides(cache: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_run(cache, out, name, "train.epochs=1", f"train.max_steps={STEPS}", "optim.lr=3e-2",
                    "lora.enabled=true", "lora.rank=4", *extra)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lora_cache")


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_single")
    summary = train(load_config(None, overrides(cache, out, "ref", "train.micro_batch_size=8", "checkpoint.every_steps=2")))
    return out / "ref", summary


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scratch_base() -> GPT:
    torch.manual_seed(1337)  # the base weights of the runs below: scratch init, seeded as train() does
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))


def test_training_updates_only_the_adapters_and_saves_merged_weights(single):
    run, summary = single
    base = scratch_base()
    adapted_params = 2 * sum(4 * i + o * 4 for i, o in ((32, 96), (32, 32), (32, 128), (128, 32)))
    assert summary["trainable_params"] == adapted_params
    assert summary["params"] == base.num_params()
    merged = load_consolidated(run / "checkpoint")  # a plain GPT: HF export and int8 take it as is
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(k.endswith(("c_attn.weight", "attn.c_proj.weight", "c_fc.weight", "mlp.c_proj.weight")) for k in changed)
    # the sharded (resumable) checkpoint holds adapters + base; loading it merges to the same weights
    from_sharded = load_sharded_model(sorted((run / "checkpoints").glob("step_*"))[-1])
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(from_sharded.state_dict()[k], v, rtol=1e-6, atol=1e-6)
    adapter = run / "adapter"
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["lora"]["rank"] == 4 and summary["adapter_bytes"] == dir_bytes(adapter)
    assert summary["adapter_bytes"] < summary["checkpoint_bytes"] / 20
    assert losses(run)[-1] < losses(run)[0]


def test_adapter_only_checkpoints_are_small_and_resume_exactly(cache, single, tmp_path):
    ref_run, _ = single
    run = tmp_path / "ao"
    args = overrides(cache, tmp_path, "ao", "train.micro_batch_size=8", "checkpoint.every_steps=2", "lora.save_adapters_only=true")
    train(load_config(None, args))
    steps = sorted((run / "checkpoints").glob("step_*"))
    full_steps = sorted((ref_run / "checkpoints").glob("step_*"))
    assert dir_bytes(steps[-1]) < dir_bytes(full_steps[-1]) / 5  # no frozen base weights in it
    with pytest.raises(CheckpointError, match="adapters only"):
        load_sharded_model(steps[-1])
    final = load_consolidated(run / "checkpoint")
    # roll back to the previous save and resume: the base is rebuilt from model.init, the adapters loaded
    shutil.rmtree(steps[-1])
    (run / "checkpoints" / "latest").write_text(steps[0].name + "\n")
    (run / "summary.json").unlink()
    s = train(load_config(None, [*args, "resume=auto"]))
    assert s["resumed_from_step"] == int(steps[0].name.split("_")[1]) < STEPS
    resumed = load_any(run)
    for k, v in final.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-6, atol=1e-6)
    assert losses(run) == pytest.approx(losses(ref_run), rel=1e-6)  # and it is the same run as with full saves


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distrib_gpt.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("strategy, extra", [("ddp", ()), ("fsdp_full", ("parallel.activation_checkpointing=true",))])
def test_lora_under_ddp_and_fsdp2_matches_one_process(strategy, extra, single, cache, tmp_path):
    ref_run, ref = single
    r = torchrun(overrides(cache, tmp_path, strategy, f"parallel.strategy={strategy}", "train.micro_batch_size=4", *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / strategy
    got, want = losses(run), losses(ref_run)
    assert len(got) == STEPS and got == pytest.approx(want, rel=1e-4)
    s = json.loads((run / "summary.json").read_text())
    assert s["trainable_params"] == ref["trainable_params"] and s["world_size"] == 2
    if strategy == "ddp":
        # DDP's hook measures what is all-reduced: the adapters' fp32 gradients only (at W=2 a
        # ring sends 2 (W-1)/W = 1x them), not the frozen base's; the FSDP figure is computed
        # on the same rule (parallel.fsdp_comm_bytes_per_step)
        assert s["comm_bytes_per_step"] == s["trainable_params"] * 4
    # the learned updates W - W_base agree. Not element by element: AdamW's first steps move
    # each weight by about lr·sign(g), so a gradient entry near 0 whose sign flips with the
    # reduction order moves the other way; the loss curve above is the exact check.
    merged, ref_merged = load_consolidated(run / "checkpoint").state_dict(), load_consolidated(ref_run / "checkpoint").state_dict()
    base = scratch_base().state_dict()
    for k in ref_merged:
        if k.endswith("weight") and not torch.equal(ref_merged[k], base[k]):
            want_delta = ref_merged[k] - base[k]
            assert (merged[k] - ref_merged[k]).norm() <= 0.05 * want_delta.norm(), k


@pytest.mark.slow
def test_lora_compiles(cache, tmp_path):
    s = train(load_config(None, overrides(cache, tmp_path, "compiled", "parallel.compile=true", "train.micro_batch_size=8")))
    assert s["steps"] == STEPS and s["train_loss_by_epoch"][-1] < s["train_loss_by_epoch"][0]
