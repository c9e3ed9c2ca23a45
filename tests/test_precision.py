import pytest
import torch

from distrib_gpt import precision as P
from distrib_gpt.precision import PrecisionError, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "requested, name, dtype, scaling",
    [
        ("fp32", "fp32", None, False),
        ("tf32", "tf32", None, False),
        ("fp16", "fp16", torch.float16, True),
        ("bf16", "bf16", torch.bfloat16, False),
        ("auto", "bf16", torch.bfloat16, False),
    ],
)
def test_cpu_policies(requested, name, dtype, scaling):
    p = resolve_precision(requested, CPU)
    assert (p.name, p.autocast_dtype, p.grad_scaling, p.requested) == (name, dtype, scaling, requested)
    assert p.tf32 is False  # TF32 is a GPU tensor-core mode
    assert (p.make_grad_scaler() is not None) == scaling
    lin = torch.nn.Linear(4, 4)
    with p.autocast():
        out = lin(torch.randn(2, 4))
    assert out.dtype == (dtype or torch.float32)


def test_tf32_on_cpu_is_reported():
    assert "fp32" in resolve_precision("tf32", CPU).note
    assert resolve_precision("fp32", CPU).note is None


def _fake_gpu(monkeypatch, capability, name):
    monkeypatch.setattr(P, "_cuda_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability[0] >= 8)


@pytest.mark.parametrize("requested", ["bf16", "tf32"])
def test_t4_refuses_bf16_and_tf32_suggesting_fp16(monkeypatch, requested):
    _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    with pytest.raises(PrecisionError) as e:
        resolve_precision(requested, torch.device("cuda", 0))
    msg = str(e.value)
    assert requested in msg and "Tesla T4" in msg and "7.5" in msg and "precision=fp16" in msg


def test_auto_picks_fp16_on_t4_and_bf16_on_a100(monkeypatch):
    _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    assert resolve_precision("auto", torch.device("cuda", 0)).name == "fp16"
    _fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-40GB")
    assert resolve_precision("auto", torch.device("cuda", 0)).name == "bf16"
    tf32 = resolve_precision("tf32", torch.device("cuda", 0))
    assert tf32.tf32 and tf32.autocast_dtype is None
    assert resolve_precision("fp32", torch.device("cuda", 0)).tf32 is False
