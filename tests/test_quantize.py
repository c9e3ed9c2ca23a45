"""int8 quantization with torchao: layers actually quantized, loss vs fp32, safe save/load, the
end-of-training hook, quant_summary.json, the quality gate and one-line failures.

One small model (2 layers, 64 wide) is trained once for the module, with
quantize.after_training=true, so the hook itself produces the int8 checkpoint and summary the
other tests read. Loss tolerance: 1% relative, the command's default gate. On this model int8
lands far inside it (about 0.001% for all three methods when this was written): a 2-layer,
64-wide model trained for two short epochs is an honest functional check, not a stress test of
int8 quality, which needs a realistic model (docs/benchmarks.md).
"""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distrib_gpt import cli
from distrib_gpt import quantize as Q
from distrib_gpt.checkpoint import load_consolidated
from distrib_gpt.config import load_config
from distrib_gpt.generate import generate
from distrib_gpt.train import train

def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return " avx2 " in " " + Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0] + " "
    except (OSError, IndexError):
        return False


CPU_HAS_AVX2 = _cpu_has_avx2()
BLOCK_LINEARS = [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def tiny(tmp: Path, *extra: str) -> list[str]:
    return [
        "model.name=custom", "model.init=scratch", "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
        "model.block_size=64", "data.source=bundled", "data.max_examples=160", "data.val_fraction=0.25",
        "data.seq_len=64", f"data.cache_dir={tmp / 'cache'}", f"run.out_dir={tmp / 'runs'}", "run.name=q",
        "run.device=cpu", "train.epochs=2", "train.micro_batch_size=4", "train.progress=false", "train.log_every=50",
        "optim.lr=1e-2", "optim.warmup_steps=2", "eval.train_subset_batches=1", "eval.val_batches=null",
        "quantize.measure_prompt_tokens=16", "quantize.measure_new_tokens=4", "quantize.measure_repeats=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    cfg = load_config(None, tiny(tmp, "quantize.after_training=true"))
    train(cfg)
    return cfg, tmp / "runs" / "q"


def fp_model(run):
    return load_consolidated(run[1] / "checkpoint").eval()


def test_after_training_writes_int8_checkpoint_and_summary(run):
    _, run_dir = run
    s = json.loads((run_dir / "quant_summary.json").read_text())
    assert (run_dir / "checkpoint_int8" / "model.safetensors").is_file()
    assert s["method"] == "int8_dynamic"
    assert s["quantized_layers"] == s["linear_layers"] == 9
    assert set(s["layers"]) == set(BLOCK_LINEARS) | {"lm_head"}
    v = s["val"]
    assert v["tokens"] > 200 and v["batches"] >= 2
    assert abs(v["rel_loss_delta"]) < 0.01 and s["gate"] == {"rel_loss_max": 0.01, "passed": True}
    assert v["perplexity_int8"] == pytest.approx(torch.tensor(v["loss_int8"]).exp().item(), rel=1e-6)
    # the tied embedding/LM head is stored once, in int8: the file is ~27% of fp32
    assert s["file_bytes"]["ratio"] <= 0.30
    for name in ("fp32", "int8"):
        m = s["inference"][name]
        assert m["int8"] == (name == "int8")
        assert m["prefill_ms_batch1"] > 0 and m["peak_rss_bytes"] > 0
        assert set(m["decode_tokens_per_s"]) == {"1", "8"} and all(x > 0 for x in m["decode_tokens_per_s"].values())
    assert "decode_tokens_per_s_batch1" in s["inference"]["int8_vs_fp32"]
    kernel = "fbgemm" if CPU_HAS_AVX2 else "torchao"
    assert s["kernels"] == dict.fromkeys(s["layers"], kernel)
    assert s["inference"]["int8"]["int8_kernels"] == [kernel] and s["inference"]["fp32"]["int8_kernels"] == []


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_weight_only", "int8_static"])
def test_int8_loss_within_tolerance(run, method):
    cfg, _ = run
    prepared, loader = Q.val_loader(cfg)
    cpu = torch.device("cpu")
    model = fp_model(run)
    fp = Q.eval_loss(model, loader, None, cpu)["loss"]
    calib = Q.calibration_batches(prepared.dir, 16, cfg.data.seq_len, cpu) if method == "int8_static" else None
    layers = Q.quantize_model(model, method, calib_batches=calib)
    assert len(Q.quantized_layers(model)) == 9 and set(layers.values()) <= {method, "int8_dynamic"}
    q8 = Q.eval_loss(model, loader, None, cpu)["loss"]
    assert q8 != fp  # the model really changed
    assert abs(q8 - fp) / fp < 0.01, (method, fp, q8)


def test_quantized_count_matches_chosen_layers(run):
    model = fp_model(run)
    assert Q.quantize_model(model, "int8_dynamic", lm_head=False).keys() == set(BLOCK_LINEARS)
    assert sorted(Q.quantized_layers(model)) == sorted(BLOCK_LINEARS)
    assert isinstance(model.transformer.wte, nn.Embedding) and not Q.is_int8(model.lm_head.weight)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, still floating point

    model = fp_model(run)
    layers = Q.quantize_model(model, "int8_weight_only", skip=["*.mlp.c_proj", "transformer.h.0.attn.*"])
    expected = {"transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc", "lm_head"}
    assert set(layers) == set(Q.quantized_layers(model)) == expected
    assert model.transformer.wte.weight is model.lm_head.weight and Q.is_int8(model.lm_head.weight)

    with pytest.raises(Q.QuantizationError, match="nothing to quantize"):
        Q.quantize_model(fp_model(run), "int8_dynamic", lm_head=False, skip=["transformer.*"])


def test_a_silent_no_op_is_caught(run, monkeypatch):
    """If torchao quantized nothing, quantize_model must fail rather than report success."""
    api = Q.torchao_api()
    monkeypatch.setattr(Q, "torchao_api", lambda: {**api, "quantize_": lambda *a, **k: None})
    with pytest.raises(Q.QuantizationError, match="quantized 0 Linear layers but 9 were chosen"):
        Q.quantize_model(fp_model(run), "int8_dynamic")


def test_saved_int8_loads_back_exactly_without_pickle(run):
    ckpt = run[1] / "checkpoint_int8"
    raw = (ckpt / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw arrays
    assert header["lm_head.weight.qdata"]["dtype"] == "I8" and "transformer.wte.weight" not in header
    assert json.loads((ckpt / "config.json").read_text())["quantization"]["method"] == "int8_dynamic"

    model = fp_model(run)
    Q.quantize_model(model, "int8_dynamic")
    loaded = Q.load_model(ckpt)
    assert loaded.transformer.wte.weight is loaded.lm_head.weight
    assert sorted(Q.quantized_layers(loaded)) == sorted(BLOCK_LINEARS + ["lm_head"])
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    # the KV cache works on the int8 model: greedy tokens equal the uncached recomputation
    cached = generate(loaded, idx, 8, temperature=0, stop_at_eot=False)
    plain = generate(loaded, idx, 8, temperature=0, stop_at_eot=False, use_cache=False)
    assert cached.tokens == plain.tokens


needs_fbgemm = pytest.mark.skipif(not CPU_HAS_AVX2, reason="fbgemm int8 kernels need an x86 CPU with AVX2")


def test_fbgemm_kernel_is_used_on_avx2_cpus():
    """On an x86 CPU with AVX2 (read from /proc/cpuinfo, not from the code under test) the fast
    kernel must be there: a torch upgrade that drops it fails here instead of silently
    falling back to torchao's CPU path (several times slower, docs/benchmarks.md)."""
    if not CPU_HAS_AVX2:
        pytest.skip("not an x86 CPU with AVX2")
    assert Q.fbgemm_available()


def fbgemm_reference(x: torch.Tensor, weight) -> torch.Tensor:
    """What Int8DynamicLinearCPU computes, written out: each row scaled to max |x| = 1, then
    rounded to a multiple of 2/127 (fbgemm's scale for the range [-1, 1] with reduce_range:
    integers -64..64, stored as uint8 around zero point 64), an exact integer matmul with the
    int8 weight, then the weight's and the row's scales."""
    amax = x.abs().amax(-1, keepdim=True)
    s = 2.0 / 127.0
    xq = torch.round(x / amax / s)
    assert xq.abs().max() <= 64
    acc = xq.double() @ weight.qdata.double().t()
    return (acc * s * weight.scale.double().reshape(1, -1) * amax.double()).float()


@needs_fbgemm
def test_cpu_kernel_computes_per_token_int8_and_keeps_the_same_weights(run, tmp_path):
    """On a CPU, int8_dynamic layers run on fbgemm (Int8DynamicLinearCPU): same int8 data as
    torchao's, per-token 7-bit activations, rows independent of each other, round trip exact."""
    ref = fp_model(run)
    ao_model = fp_model(run)
    layers = Q.quantize_model(ao_model, "int8_dynamic", kernel="torchao")
    fb_model = fp_model(run)
    assert Q.quantize_model(fb_model, "int8_dynamic") == layers  # kernel="auto"
    assert set(Q.layer_kernels(ao_model).values()) == {"torchao"}
    assert Q.layer_kernels(fb_model) == dict.fromkeys(layers, "fbgemm")
    assert sorted(Q.quantized_layers(fb_model)) == sorted(layers)
    assert fb_model.transformer.wte.weight is fb_model.lm_head.weight  # the tie survives
    # the same int8 weights and scales (state_dict unpacks fbgemm's copy)
    sd_ao, sd_fb = ao_model.state_dict(), fb_model.state_dict()
    assert sd_ao.keys() == sd_fb.keys()
    for k, t in sd_ao.items():
        if Q.is_int8(t):
            assert torch.equal(t.qdata, sd_fb[k].qdata) and torch.equal(t.scale, sd_fb[k].scale), k
    # the numerics: per-token 7-bit activations, as written out in fbgemm_reference
    layer = fb_model.transformer.h[0].mlp.c_fc
    x = torch.randn(5, layer.in_features) * torch.tensor([[0.01], [1.0], [30.0], [1.0], [1.0]])
    bias = layer.bias.detach()
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, fbgemm_reference(x, layer.int8_weight()) + bias, rtol=1e-4, atol=1e-5)
        # each row's result depends on that row alone: batch, order and neighbours do not matter
        assert torch.equal(layer(x[1:2]), y[1:2])
        x2 = x.clone()
        x2[0] *= 1000.0
        assert torch.equal(layer(x2)[1:], y[1:])
    # quality: close to the fp32 model and to torchao's kernel on the same weights
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        l_ref, l_ao, l_fb = ref(idx), ao_model(idx), fb_model(idx)
    assert (l_fb - l_ref).abs().max() < 4 * (l_ao - l_ref).abs().max() + 1e-3
    # saved once, loaded with either kernel
    ckpt = Q.save_quantized(fb_model, layers, tmp_path / "fb", "int8_dynamic")
    back = Q.load_quantized(ckpt)
    back_ao = Q.load_quantized(ckpt, kernel="torchao")
    assert set(Q.layer_kernels(back).values()) == {"fbgemm"} and set(Q.layer_kernels(back_ao).values()) == {"torchao"}
    with torch.no_grad():
        assert torch.equal(back(idx), l_fb)
        assert torch.equal(back_ao(idx), l_ao)
    with pytest.raises(Q.QuantizationError, match="int8 kernel 'tpu'"):
        Q.load_quantized(ckpt, kernel="tpu")


@needs_fbgemm
def test_cpu_kernel_applies_to_dynamic_layers_only(run):
    """int8_weight_only keeps torchao's kernel (fbgemm has no weight-only int8 linear); under
    int8_static only the LM head (dynamic activations) moves to fbgemm."""
    cfg, _ = run
    model = fp_model(run)
    Q.quantize_model(model, "int8_weight_only")
    assert set(Q.layer_kernels(model).values()) == {"torchao"}
    prepared, _ = Q.val_loader(cfg)
    calib = Q.calibration_batches(prepared.dir, 4, cfg.data.seq_len, torch.device("cpu"))
    model = fp_model(run)
    layers = Q.quantize_model(model, "int8_static", calib_batches=calib)
    kernels = Q.layer_kernels(model)
    assert {n for n, k in kernels.items() if k == "fbgemm"} == {n for n, m in layers.items() if m == "int8_dynamic"} == {"lm_head"}


def _cli(capsys, *args):
    code = cli.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_gate_failure_fails_the_command_in_one_line(run, monkeypatch, capsys, tmp_path):
    _, run_dir = run
    real = Q.quantize_model

    def damaged(model, *a, **k):  # spoil the tied LM head / embedding (x 0.25), then quantize
        with torch.no_grad():
            model.lm_head.weight.mul_(0.25)
        return real(model, *a, **k)

    monkeypatch.setattr(Q, "quantize_model", damaged)
    out = tmp_path / "int8"
    code, err = _cli(capsys, "quantize", "--checkpoint", str(run_dir / "checkpoint"), "--out", str(out), "--no-measure")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: quantize.gate_rel_loss: int8 validation loss")
    assert "over the 1.00% gate" in err[0]
    s = json.loads((out / "quant_summary.json").read_text())
    assert s["gate"]["passed"] is False and s["val"]["rel_loss_delta"] > 0.01 and s["inference"] is None


def test_quantize_and_eval_bad_inputs(run, capsys, tmp_path):
    _, run_dir = run
    ckpt = str(run_dir / "checkpoint")
    code, err = _cli(capsys, "quantize", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and "missing: checkpoint directory not found" in err[0]
    code, err = _cli(capsys, "quantize", "--checkpoint", str(run_dir / "checkpoint_int8"), "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and "already an int8 checkpoint" in err[0]
    code, err = _cli(capsys, "quantize", "--checkpoint", ckpt, "--out", str(run_dir / "checkpoint_int8"))
    assert code == 2 and len(err) == 1 and "exists and is not empty" in err[0]
    code, err = _cli(capsys, "quantize", "--checkpoint", ckpt, "--out", str(run_dir), "--overwrite")
    assert code == 2 and len(err) == 1 and "contains the source checkpoint" in err[0]
    # a checkpoint of another shape than the data needs
    code, err = _cli(capsys, "eval", "--checkpoint", ckpt, "data.seq_len=128", "model.block_size=128")
    assert code == 2 and len(err) == 1 and "has 64 positions but data.seq_len is 128" in err[0]
    # no config.yaml next to the checkpoint and no --config: the validation data is unknown
    code, err = _cli(capsys, "eval", "--checkpoint", str(tmp_path / "nope"))
    assert code == 2 and "checkpoint directory not found" in err[0]

    # an int8 checkpoint whose config.json claims another shape: one line from a fresh process
    # (torchao is imported on that path; its import-time log noise must not reach stderr)
    bad = tmp_path / "bad_int8"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((run_dir / "checkpoint_int8" / "model.safetensors").read_bytes())
    meta = json.loads((run_dir / "checkpoint_int8" / "config.json").read_text())
    meta["model"]["n_embd"] = 32
    (bad / "config.json").write_text(json.dumps(meta))
    r = subprocess.run(
        [sys.executable, "-m", "distrib_gpt", "eval", "--checkpoint", str(bad), "--config", str(run_dir / "config.yaml")],
        check=False, capture_output=True, text=True, cwd=tmp_path,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "config.json implies" in lines[0]


def test_eval_command_reports_int8_loss(run, capsys):
    _, run_dir = run
    s = json.loads((run_dir / "quant_summary.json").read_text())
    assert cli.main(["eval", "--checkpoint", str(run_dir / "checkpoint_int8"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["method"] == "int8_dynamic" and r["loss"] == pytest.approx(s["val"]["loss_int8"], rel=1e-9)
