"""int8 inference: quantize a consolidated checkpoint with torchao, save it without pickle, load
it back, and compare it with the original: validation loss, file size, memory and speed.

    distrib-gpt quantize --checkpoint runs/x/checkpoint --out runs/x/checkpoint_int8
    distrib-gpt train ... quantize.after_training=true      # the same when training ends

Methods (`quantize.method`; torchao's `quantize_` with the config named):

- `int8_dynamic` (default), `Int8DynamicActivationInt8WeightConfig`: weights int8, symmetric,
  one scale per output channel; activations quantized per token at run time; the matmul is
  integer with int32 accumulation. On a CPU the matmul is fbgemm's, not torchao's
  (`Int8DynamicLinearCPU`, activations 7-bit per token): torchao's CPU kernel is slower than
  fp32 on AVX2 CPUs, fbgemm's 1.4-4.3x faster (see the note above that class). Elsewhere it is
  torchao's. `kernel=` of `quantize_model` / `load_quantized` / `load_model` chooses ("auto",
  "fbgemm", "torchao").
- `int8_weight_only`, `Int8WeightOnlyConfig`: the same int8 weights; activations stay in
  floating point and the weights are dequantized inside the matmul.
- `int8_static`, `Int8StaticActivationInt8WeightConfig`: the same int8 weights; each layer's
  activations use ONE fixed scale (symmetric, per tensor), the largest |input| the layer saw
  on `quantize.calib_examples` training examples / 127.5. torchao 0.18 requires that scale to
  have as many dimensions as the layer's input, so it is kept for the block layers (always
  called with (B, T, C)) while the LM head, called with 2-D and 3-D inputs, uses dynamic
  activations under this method. Verified on CPU; not verified on CUDA (no GPU was available).

Which layers: every nn.Linear in the blocks (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
except those matching `quantize.skip`; plus the LM head when `quantize.lm_head` (default).
The LM head is tied to the token embedding, so one int8 matrix with a scale per vocabulary
row serves both: the head's matmul, and the embedding lookup (rows gathered in int8, then
scaled; `TiedInt8Embedding`). The position embedding, LayerNorms and biases stay fp32.

On-disk format (a directory like a consolidated checkpoint, safetensors + config.json):

    model.safetensors   plain tensors under their state-dict names (fp32), and for each int8
                        weight `<layer>.weight`: `<layer>.weight.qdata` (int8, out x in),
                        `<layer>.weight.scale` (fp32, out x 1) and, for int8_static,
                        `<layer>.weight.act_scale` (fp32, 1 x 1 x 1)
    config.json         the GPTConfig, plus "quantization": method, torchao version and the
                        method of every quantized layer

Why not `torch.save` of the quantized model: torchao weights are tensor subclasses, and
unpickling them runs code named in the file; `torch.load(weights_only=True)` with torchao's
safe globals would restrict that to allow-listed classes, but it still ties the file to the
pickled layout of torchao's private classes (which changes between releases) and widens what a
malicious file may construct. safetensors holds only named, typed arrays: loading cannot run
code. `load_quantized` re-wraps the plain int8 data and scales in torchao's `Int8Tensor`
(symmetric, so its zero point is zero) with the activation settings of the method recorded in
config.json (and, on a CPU, packs the `int8_dynamic` layers for fbgemm). The kernel is a run-time
choice: the file is the same whichever computes it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .checkpoint import CONFIG, WEIGHTS, CheckpointError, atomic_dir, load_consolidated
from .model import GPT, GPTConfig

METHODS = ("int8_dynamic", "int8_weight_only", "int8_static")
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
FORMAT_VERSION = 1
QUANT_SUMMARY = "quant_summary.json"


class QuantizationError(RuntimeError):
    """Quantization cannot proceed, or its result failed the quality gate."""


# --------------------------------------------------------------------------- torchao


def torchao_api() -> dict[str, Any]:
    """torchao's pieces we use, imported with its import-time noise silenced (log warnings
    about CUDA-only extension libraries a CPU build of torch cannot load, a torch.compile
    deprecation note, torch.jit deprecation warnings), so command-line errors stay one line."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import torchao
            from torchao.quantization import (
                Int8DynamicActivationInt8WeightConfig,
                Int8StaticActivationInt8WeightConfig,
                Int8Tensor,
                Int8WeightOnlyConfig,
                PerRow,
                PerTensor,
                quantize_,
            )
            from torchao.quantization.quant_primitives import MappingType
            from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
                QuantizeTensorToInt8Kwargs,
            )
    except ImportError as e:  # pragma: no cover - an install problem
        raise QuantizationError(f"int8 quantization needs torchao (pip install torchao): {e}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return {
        "version": torchao.__version__, "quantize_": quantize_, "Int8Tensor": Int8Tensor, "PerRow": PerRow, "PerTensor": PerTensor,
        "MappingType": MappingType, "Kwargs": QuantizeTensorToInt8Kwargs, "Dynamic": Int8DynamicActivationInt8WeightConfig,
        "WeightOnly": Int8WeightOnlyConfig, "Static": Int8StaticActivationInt8WeightConfig,
    }


def is_int8(t: Any) -> bool:
    return type(t).__name__ == "Int8Tensor" and hasattr(t, "qdata")


class TiedInt8Embedding(nn.Module):
    """The token embedding when the tied LM head is int8: it shares the head's Int8Tensor and
    looks rows up in int8, scaling each by its row's scale (torchao's own embedding op would
    dequantize the whole vocabulary matrix on every call)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # the same Parameter as lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.embedding(idx, w.qdata).to(w.dtype) * F.embedding(idx, w.scale).to(w.dtype)


# ------------------------------------------------- int8 tensors, and the CPU kernel


def make_int8_tensor(qdata: torch.Tensor, scale: torch.Tensor, method: str, act_scale: torch.Tensor | None = None):
    """torchao's Int8Tensor for symmetric int8 `qdata` (out x in) with one `scale` per output
    channel (out x 1), carrying the activation settings of `method` (what `quantize_` makes)."""
    ao = torchao_api()
    per_row = ao["PerRow"]()
    if method == "int8_dynamic":
        act_kwargs = ao["Kwargs"](granularity=per_row, mapping_type=ao["MappingType"].SYMMETRIC)
    elif method == "int8_static":
        act_kwargs = ao["Kwargs"](granularity=ao["PerTensor"](), mapping_type=ao["MappingType"].SYMMETRIC)
    else:
        act_kwargs = None
    return ao["Int8Tensor"](
        qdata, scale, [1, qdata.shape[1]], torch.float32,
        zero_point=torch.zeros_like(scale, dtype=torch.int8),
        act_quant_scale=act_scale, act_quant_kwargs=act_kwargs,
    )


# Why int8_dynamic does not run through torchao's kernel on a CPU. torchao 0.18 sends an
# Int8Tensor's dynamic linear to `torch._int_mm` (s8 x s8 -> s32), whose CPU implementation is
# fast only with AVX-512 VNNI or AMX; on an AVX2 CPU it is slower than the fp32 matmul it
# replaces. PyTorch's fbgemm kernel for dynamic int8 linear (`quantized::linear_dynamic`, an
# ATen-registered op: the kernel behind PyTorch's dynamic-quantization tutorials, e.g. BERT) has
# AVX2 and AVX-512 paths and reads the packed int8 weight once per call. Measured with
# `python bench/int8_inference.py --kernels-only` on the development machine (2-core AMD EPYC,
# AVX2, no AVX-512/VNNI; 2 threads), one GPT-2 124M layer at batch 1, weights from DRAM, µs:
#
#     layer (in x out)       fp32   bf16   torchao dyn   torchao w-only   _weight_int8pack_mm   fbgemm
#     768 x 2304              794    336       1,933            991               1,697            360
#     768 x 3072              975    354       1,933          1,524               1,952            310
#     3072 x 768              697    345       2,233            693               2,001            343
#     768 x 50,304 (head)  13,811  5,781      22,495         91,155              32,905          3,212
#
# (`torch._weight_int8pack_mm`, ATen's int8 weight-only kernel, vectorizes for AVX-512 only;
# torchao's weight-only path dequantizes the whole weight on every call.) torchao stays the
# quantizer (scales, rounding, Int8Tensor, the saved format) and the kernel everywhere else
# (CUDA, CPUs without fbgemm); only the CPU matmul of `int8_dynamic` layers is fbgemm's.

_FBGEMM_OK: bool | None = None


def _fbgemm_prepack(qdata: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of an int8 weight (out x in) with per-output-channel `scale`."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError("this torch build has no fbgemm engine")
    out_f = qdata.shape[0]
    with warnings.catch_warnings():
        # torch 2.13 deprecates creating qint8 tensors; fbgemm's prepack still takes one. The
        # tensor lives for this call only (the packed weight is fbgemm's own buffer).
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        qw = torch._make_per_channel_quantized_tensor(
            qdata.contiguous(), scale.detach().reshape(-1).double(), torch.zeros(out_f, dtype=torch.long), 0
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        return torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = previous


def fbgemm_available() -> bool:
    """Whether fbgemm's int8 kernels run here (x86 CPU with AVX2 or better, torch built with
    fbgemm): checked once by packing and running a tiny layer."""
    global _FBGEMM_OK
    if _FBGEMM_OK is None:
        try:
            packed = _fbgemm_prepack(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1))
            y = torch.ops.quantized.linear_dynamic(torch.ones(2, 8), packed, True)
            _FBGEMM_OK = bool(y.shape == (2, 4))
        except (RuntimeError, AttributeError, NotImplementedError):
            _FBGEMM_OK = False
    return _FBGEMM_OK


class Int8DynamicLinearCPU(nn.Module):
    """An `int8_dynamic` Linear layer on the CPU, computed by fbgemm (see the note above).

    Weight: the torchao Int8Tensor's int8 data and per-output-channel scales, packed once for
    fbgemm with two zero input columns appended (below); the packed copy is the only one kept,
    except for the tied LM head, whose Int8Tensor the token embedding also reads
    (`keep_weight`). `state_dict()` gives the Int8Tensor back (unpacked, bit-exact), so saving
    is unchanged.

    Activations, per call: each row (token) is divided by its largest |value|, and two
    columns, +1 and -1, are appended to every row (they meet the two zero weight columns, so
    they add nothing). Every row then spans exactly [-1, 1], and so does the whole input: the
    range fbgemm finds is [-1, 1] whatever the batch holds. (Pinning the range with an extra
    row instead would give the same numbers but makes a batch-1 call an M=2 one, which fbgemm
    runs 20% slower at decode sizes: measured.) fbgemm quantizes with `reduce_range` (scale
    2/127: each value becomes an integer in -64..64, about 7 bits; with full 8-bit activations
    the u8 x s8 multiply-adds of CPUs without VNNI saturate int16: measured 7% error on random
    data), multiplies u8 x s8 -> s32 exactly, scales back per output channel, and each row is
    multiplied by its own largest |value|. The net effect is
    per-token dynamic quantization, like torchao's int8_dynamic but with 7-bit instead of 8-bit
    activations; and a row's result depends on that row only, so a token computes the same
    with or without the KV cache and in any batch (tests/test_quantize.py writes the
    arithmetic out and checks it).
    """

    def __init__(self, weight: Any, bias: torch.Tensor | None, keep_weight: bool) -> None:
        super().__init__()
        if not is_int8(weight) or weight.device.type != "cpu":
            raise QuantizationError("Int8DynamicLinearCPU takes a CPU Int8Tensor weight")
        self.out_features, self.in_features = weight.shape
        self.weight = weight if keep_weight else None  # an nn.Parameter stays registered
        self.bias = bias
        zero_columns = torch.zeros(self.out_features, 2, dtype=torch.int8)
        self._packed = _fbgemm_prepack(torch.cat([weight.qdata, zero_columns], dim=1), weight.scale)
        self.register_buffer("_pin", torch.tensor([[1.0, -1.0]]), persistent=False)

    def int8_weight(self):
        """The layer's weight as torchao's Int8Tensor (unpacked from fbgemm when not kept)."""
        if self.weight is not None:
            return self.weight
        qw, _ = torch.ops.quantized.linear_unpack(self._packed)
        qdata = qw.int_repr()[:, : self.in_features].contiguous()
        return make_int8_tensor(qdata, qw.q_per_channel_scales().float().reshape(-1, 1), "int8_dynamic")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is None:
            destination[prefix + "weight"] = self.int8_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        amax = x2.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        xn = torch.cat([x2 / amax, self._pin.expand(x2.shape[0], 2)], dim=1)
        y = torch.ops.quantized.linear_dynamic(xn, self._packed, True)
        y = y * amax if self.bias is None else torch.addcmul(self.bias, y, amax)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel=fbgemm"


KERNELS = ("auto", "torchao", "fbgemm")


def use_cpu_kernel(model: GPT, layers: dict[str, str], kernel: str = "auto") -> dict[str, str]:
    """Run the `int8_dynamic` layers of a CPU model through fbgemm (`Int8DynamicLinearCPU`)
    when `kernel` is "fbgemm", or "auto" and fbgemm is available; returns {layer: kernel}
    for every layer in `layers` ("torchao" for the rest)."""
    if kernel not in KERNELS:
        raise QuantizationError(f"int8 kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    modules = dict(model.named_modules())
    dynamic = [n for n, m in layers.items() if m == "int8_dynamic" and isinstance(modules[n], nn.Linear)]
    on_cpu = all(modules[n].weight.device.type == "cpu" for n in dynamic)
    if kernel == "fbgemm" and dynamic and not (on_cpu and fbgemm_available()):
        raise QuantizationError("int8 kernel fbgemm: needs the model on an x86 CPU with a torch build that has fbgemm")
    use = kernel != "torchao" and bool(dynamic) and on_cpu and fbgemm_available()
    out = {n: "torchao" for n in layers}
    if not use:
        return out
    tied = getattr(model.transformer.wte, "weight", None)
    for name in dynamic:
        lin = modules[name]
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        new = Int8DynamicLinearCPU(lin.weight, lin.bias, keep_weight=lin.weight is tied)
        setattr(parent, child, new)
        out[name] = "fbgemm"
    return out


def layer_kernels(model: nn.Module) -> dict[str, str]:
    """{int8 layer: the kernel its matmul runs on}."""
    return {
        n: "fbgemm" if isinstance(m, Int8DynamicLinearCPU) else "torchao"
        for n, m in model.named_modules()
        if isinstance(m, Int8DynamicLinearCPU) or (isinstance(m, nn.Linear) and is_int8(m.weight))
    }


# ----------------------------------------------------------------- which layers


def linear_names(model: GPT) -> list[str]:
    """Every nn.Linear in the model, in module order (lm_head last)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def select_layers(model: GPT, lm_head: bool, skip: list[str]) -> list[str]:
    """The Linear layers to quantize: block projections not matched by `skip`, plus the
    tied LM head if `lm_head` (and not skipped)."""
    chosen = []
    for name in linear_names(model):
        if name == "lm_head" and not lm_head:
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in skip):
            continue
        chosen.append(name)
    return chosen


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the Linear layers whose weight is actually int8 now (torchao's Int8Tensor, or
    fbgemm's packed copy of one in `Int8DynamicLinearCPU`)."""
    return list(layer_kernels(model))


# ------------------------------------------------------------------ quantization


@torch.no_grad()
def calibrate(model: GPT, layers: list[str], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Largest |input| of each layer in `layers` over the calibration batches."""
    modules = dict(model.named_modules())
    amax = {n: 0.0 for n in layers}
    hooks = []
    for n in layers:
        def hook(mod, args, n=n):
            amax[n] = max(amax[n], float(args[0].detach().abs().max()))
        hooks.append(modules[n].register_forward_pre_hook(hook))
    model.eval()
    try:
        for x, y in batches:
            model(x, y, reduction="sum", return_logits=False)
    finally:
        for h in hooks:
            h.remove()
    return amax


def quantize_model(
    model: GPT,
    method: str,
    lm_head: bool = True,
    skip: list[str] | None = None,
    calib_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    kernel: str = "auto",
) -> dict[str, str]:
    """Quantize `model` in place with torchao; returns {layer name: method applied}.

    `kernel` picks what computes the `int8_dynamic` layers of a CPU model (`use_cpu_kernel`):
    "auto" (fbgemm where available), "fbgemm" or "torchao". Raises QuantizationError if the
    set of int8 layers afterwards is not exactly the set chosen (a silent no-op cannot pass)."""
    if method not in METHODS:
        raise QuantizationError(f"quantize.method: {method!r} is not one of {', '.join(METHODS)}")
    if kernel not in KERNELS:
        raise QuantizationError(f"int8 kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    ao = torchao_api()
    chosen = select_layers(model, lm_head, skip or [])
    if not chosen:
        raise QuantizationError("quantize.skip: every Linear layer is skipped; nothing to quantize")
    model.eval()
    applied: dict[str, str] = {}

    def only(names: set[str]) -> Callable[[nn.Module, str], bool]:
        return lambda mod, fqn: isinstance(mod, nn.Linear) and fqn in names

    static = [n for n in chosen if n != "lm_head"] if method == "int8_static" else []
    if static:
        if not calib_batches:
            raise QuantizationError("quantize.method int8_static needs calibration examples (quantize.calib_examples)")
        amax = calibrate(model, static, calib_batches)
        for n in static:
            # on the layer's device: a CPU scale would meet CUDA activations in the first forward
            device = model.get_submodule(n).weight.device
            scale = torch.tensor(max(amax[n], 1e-8) / 127.5, dtype=torch.float32, device=device).reshape(1, 1, 1)
            config = ao["Static"](
                act_quant_scale=scale, granularity=[ao["PerTensor"](), ao["PerRow"]()], set_inductor_config=False
            )
            ao["quantize_"](model, config, filter_fn=only({n}))
            applied[n] = "int8_static"
    rest = {n for n in chosen if n not in applied}
    if rest:
        rest_method = "int8_weight_only" if method == "int8_weight_only" else "int8_dynamic"
        config = ao["WeightOnly"](set_inductor_config=False) if rest_method == "int8_weight_only" else ao["Dynamic"](
            set_inductor_config=False
        )
        ao["quantize_"](model, config, filter_fn=only(rest))
        applied.update({n: rest_method for n in rest})
    if "lm_head" in applied:
        # quantize_ gave lm_head a new weight, untying it from wte: make the embedding read
        # the same int8 matrix so the model stays tied (and wte's fp32 copy is freed)
        model.transformer.wte = TiedInt8Embedding(model.lm_head.weight)
    done = set(quantized_layers(model))
    if done != set(chosen):
        raise QuantizationError(
            f"torchao quantized {len(done)} Linear layers but {len(chosen)} were chosen "
            f"(not quantized: {sorted(set(chosen) - done)[:3]})"
        )
    layers = {n: applied[n] for n in chosen}
    use_cpu_kernel(model, layers, kernel)
    return layers


# ------------------------------------------------------------------ save / load


def save_quantized(model: GPT, layers: dict[str, str], out_dir: Path, method: str) -> Path:
    """Write a quantized model (see the module docstring) atomically to `out_dir`."""
    ao_version = torchao_api()["version"]
    out_dir = Path(out_dir)
    state: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        layer = key.rsplit(".", 1)[0]
        if key == "transformer.wte.weight" and "lm_head" in layers:
            continue  # the same int8 matrix as lm_head.weight
        if key == "lm_head.weight" and "lm_head" not in layers:
            continue  # tied to transformer.wte.weight, stored once as in fp checkpoints
        if is_int8(t):
            if layer not in layers:
                raise QuantizationError(f"{key} is int8 but not recorded as quantized")
            if t.zero_point is not None and bool(t.zero_point.any()):
                raise QuantizationError(f"{key}: non-zero zero point; only symmetric int8 is supported")
            state[f"{key}.qdata"] = t.qdata
            state[f"{key}.scale"] = t.scale.float()
            if t.act_quant_scale is not None:
                state[f"{key}.act_scale"] = t.act_quant_scale.float()
        else:
            state[key] = t.detach().float() if t.is_floating_point() else t.detach()
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {
        "model": dataclasses.asdict(model.config),
        "dtype": "fp32",
        "tied": {"lm_head.weight": "transformer.wte.weight"},
        "quantization": {
            "format": FORMAT_VERSION,
            "library": "torchao",
            "torchao_version": ao_version,
            "method": method,
            "weights": "int8, symmetric, one scale per output channel (per vocabulary row for the tied head)",
            "layers": layers,
        },
    }
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "distrib_gpt": "1", "quantization": method})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir


def read_meta(ckpt_dir: Path) -> dict:
    """config.json of a checkpoint directory (fp or int8), with one-line errors."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    for p in (ckpt_dir / CONFIG, ckpt_dir / WEIGHTS):
        if not p.is_file():
            raise CheckpointError(f"{p}: checkpoint file not found")
    try:
        meta = json.loads((ckpt_dir / CONFIG).read_text(encoding="utf-8"))
        GPTConfig(**meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir / CONFIG}: not a distrib_gpt checkpoint config ({e})") from None
    return meta


def is_quantized_checkpoint(ckpt_dir: Path) -> bool:
    return "quantization" in read_meta(ckpt_dir)


def load_quantized(ckpt_dir: Path, device: str | torch.device = "cpu", kernel: str = "auto") -> GPT:
    """Rebuild an int8 model saved by `save_quantized` (no pickle: safetensors + JSON).

    The model is built on the meta device and each tensor is placed once, so loading never
    holds an fp32 copy of the weights (that would defeat the memory figures). `kernel`: as in
    `quantize_model` (on a CPU, `int8_dynamic` layers run on fbgemm unless "torchao")."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    q = meta.get("quantization")
    weights_path = ckpt_dir / WEIGHTS
    if not isinstance(q, dict) or not isinstance(q.get("layers"), dict) or q.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt_dir / CONFIG}: not an int8 checkpoint of format {FORMAT_VERSION}")
    config = GPTConfig(**meta["model"])
    torchao_api()  # an install problem is reported before the file is read
    if kernel not in KERNELS:
        raise QuantizationError(f"int8 kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    # safetensors maps the file into memory. Where fbgemm will hold its own packed copy of the
    # int8_dynamic block weights, everything else is copied out of the mapping, so the mapping
    # (whose pages packing has read) is released once those weights are packed.
    packs = kernel != "torchao" and torch.device(device).type == "cpu" and fbgemm_available()
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: corrupt or truncated safetensors file ({e})") from None
    with torch.device("meta"):
        model = GPT(config)
    modules = dict(model.named_modules())
    for name, method in q["layers"].items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear) or method not in METHODS:
            raise CheckpointError(f"{ckpt_dir / CONFIG}: unknown quantized layer {name!r} ({method!r})")
        key = f"{name}.weight"
        try:
            qdata, scale = state.pop(f"{key}.qdata"), state.pop(f"{key}.scale")
        except KeyError:
            raise CheckpointError(f"{weights_path}: missing int8 data of {key}") from None
        act_scale = state.pop(f"{key}.act_scale", None)
        out_f, in_f = mod.weight.shape
        if qdata.dtype != torch.int8 or tuple(qdata.shape) != (out_f, in_f) or tuple(scale.shape) != (out_f, 1):
            raise CheckpointError(
                f"{weights_path}: {key} is int8 data {tuple(qdata.shape)} ({qdata.dtype}) with scale "
                f"{tuple(scale.shape)}; config.json implies {(out_f, in_f)} and {(out_f, 1)}"
            )
        if method == "int8_static" and act_scale is None:
            raise CheckpointError(f"{weights_path}: missing activation scale of {key}")
        if packs:
            keeps_data = method != "int8_dynamic" or name == "lm_head"  # torchao's, or read by the embedding
            qdata, scale = (qdata.clone() if keeps_data else qdata), scale.clone()
            act_scale = None if act_scale is None else act_scale.clone()
        weight = make_int8_tensor(qdata, scale, method, act_scale)
        mod.weight = nn.Parameter(weight, requires_grad=False)
    head_int8 = "lm_head" in q["layers"]
    if head_int8:
        model.transformer.wte = TiedInt8Embedding(model.lm_head.weight)
    expected = {k: v.shape for k, v in model.state_dict().items() if v.is_meta and k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: keys do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointError(f"{weights_path}: {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(shape)}")
    model.load_state_dict({k: v.to(torch.float32, copy=packs) for k, v in state.items()}, strict=False, assign=True)
    if not head_int8:
        model.lm_head.weight = model.transformer.wte.weight  # restore the tie
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # pragma: no cover - guarded by the key check above
        raise CheckpointError(f"{weights_path}: no data for {left[:3]}")
    use_cpu_kernel(model, dict(q["layers"]), kernel)
    return model.eval()


def load_model(
    ckpt_dir: Path, device: str | torch.device = "cpu", dtype: str | None = None, kernel: str = "auto"
) -> GPT:
    """Any checkpoint this package writes: consolidated fp (fp32 parameters, or `dtype`
    "bf16") or int8 (activations fp32; `kernel` as in `load_quantized`)."""
    if is_quantized_checkpoint(ckpt_dir):
        if dtype not in (None, "fp32"):
            raise CheckpointError(f"{ckpt_dir}: an int8 checkpoint runs with fp32 activations, not {dtype}")
        return load_quantized(ckpt_dir, device, kernel)
    model = load_consolidated(ckpt_dir, map_location=device).eval()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    return model


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """Bytes on disk of a checkpoint's two files."""
    return sum((Path(ckpt_dir) / f).stat().st_size for f in (WEIGHTS, CONFIG))


# ------------------------------------------------------------------ evaluation


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError

        raise ConfigError("quantize.device: cuda was requested but no GPU is visible")
    return torch.device(name)


def check_fits(model: GPT, seq_len: int, where: str) -> None:
    """The model must hold the data's sequences and read GPT-2's token ids."""
    from .generate import check_vocabulary

    check_vocabulary(model, where)
    if model.config.block_size < seq_len:
        raise CheckpointError(
            f"{where}: the checkpoint has {model.config.block_size} positions but data.seq_len is {seq_len}; "
            f"pass data.seq_len={model.config.block_size} (or a checkpoint of this shape)"
        )


def val_loader(cfg, log: Callable[..., None] = lambda *a, **k: None):
    """The validation BatchLoader train.py evaluates on (same data, order, batch size)."""
    from .data import BatchLoader, TokenizedSplit, prepare_data

    prepared = prepare_data(cfg.data, log=log)
    split = TokenizedSplit.open(prepared.dir, "val")
    bs = cfg.eval.batch_size or cfg.train.micro_batch_size
    return prepared, BatchLoader(split, cfg.data.batching, cfg.data.seq_len, bs, seed=cfg.run.seed, shuffle=False)


@torch.no_grad()
def eval_loss(model: GPT, loader, max_batches: int | None, device: torch.device) -> dict[str, float]:
    """Mean token loss (and perplexity) over the supervised tokens of the first `max_batches`
    batches (all if None): what train.py's `evaluate` computes, single process."""
    model.eval()
    limit = len(loader) if max_batches is None else min(max_batches, len(loader))
    total, count, n = 0.0, 0, 0
    for j, batch in enumerate(loader):
        if j >= limit:
            break
        batch = batch.to(device)
        _, loss = model(batch.input_ids, batch.labels, reduction="sum", return_logits=False, **batch.model_inputs())
        total += float(loss)
        count += batch.n_supervised
        n += 1
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": count, "batches": n}


def calibration_batches(prepared_dir: Path, n: int, seq_len: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` training examples (stored order), one per batch, cut to seq_len + 1
    tokens, with labels where the loss is taken (as in training)."""
    import numpy as np

    from .data import TokenizedSplit

    split = TokenizedSplit.open(prepared_dir, "train")
    out = []
    for i in range(min(n, split.n_examples)):
        toks, mask = split.example(i)
        toks = np.asarray(toks[: seq_len + 1], dtype=np.int64)
        mask = np.asarray(mask[: seq_len + 1])
        if len(toks) < 2:
            continue
        x = torch.from_numpy(toks[:-1].copy())[None].to(device)
        y = torch.from_numpy(np.where(mask[1:] == 1, toks[1:], -100))[None].to(device)
        out.append((x, y))
    return out


# ------------------------------------------------------------------ measurement


def measure_checkpoint(ckpt_dir: str, device: str, opts: dict) -> dict:
    """Load `ckpt_dir` and time it (runs inside a fresh `python -m distrib_gpt.quantize
    measure` process, so each model's memory is its own)."""
    from . import metrics as M
    from .generate import measure_inference

    dev = torch.device(device)
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    int8 = is_quantized_checkpoint(ckpt_dir)
    if int8:
        torchao_api()  # torchao's import is part of the baseline, like torch's
    rss_start = M.host_rss_bytes()
    t0 = time.perf_counter()
    model = load_model(ckpt_dir, dev, opts.get("dtype"), opts.get("int8_kernel", "auto"))
    load_s = time.perf_counter() - t0
    rss_loaded = M.host_rss_bytes()
    scoped = M.reset_peak_host_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timing = measure_inference(
        model, dev, opts["prompt_tokens"], opts["new_tokens"], tuple(opts["batch_sizes"]), opts["repeats"]
    )
    peak = M.peak_host_rss_bytes()  # VmHWM: since the reset when `scoped`, else the whole process
    kernels = sorted(set(layer_kernels(model).values()))
    out = {
        "int8": int8,
        "int8_kernels": kernels,
        "load_s": load_s,
        **timing,
        "rss_before_load_bytes": rss_start,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak,
        "peak_rss_above_baseline_bytes": peak - rss_start,
        "peak_rss_scope": "inference (after load; VmHWM reset)" if scoped else "whole process (getrusage)",
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def measure_in_subprocess(ckpt_dir: Path, device: torch.device, opts: dict) -> dict:
    """Run `measure_checkpoint` in a child Python process; returns its figures."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "distrib_gpt.quantize", "measure", str(ckpt_dir), str(device), json.dumps(opts)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise QuantizationError(f"measuring {ckpt_dir} failed (exit {r.returncode}): {tail}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------ the command


def run_quantize(
    cfg,
    ckpt_dir: Path,
    out_dir: Path,
    summary_path: Path,
    log: Callable[..., None] = print,
    overwrite: bool = False,
) -> dict:
    """Quantize `ckpt_dir` into `out_dir`, compare it with the original on the validation
    split of `cfg.data`, measure both, write `summary_path`; raise QuantizationError after
    writing it if the loss gate (`quantize.gate_rel_loss`) is exceeded."""
    qc = cfg.quantize
    ckpt_dir, out_dir, summary_path = Path(ckpt_dir), Path(out_dir), Path(summary_path)
    meta = read_meta(ckpt_dir)
    if "quantization" in meta:
        raise CheckpointError(f"{ckpt_dir}: already an int8 checkpoint ({meta['quantization'].get('method')}); pass the original")
    if out_dir.resolve() == ckpt_dir.resolve() or out_dir.resolve() in ckpt_dir.resolve().parents:
        raise QuantizationError(f"--out {out_dir} is or contains the source checkpoint; choose another directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise QuantizationError(f"--out {out_dir} exists and is not empty; choose another directory or pass --overwrite")
    device = resolve_device(qc.device)
    started = time.time()

    model = load_consolidated(ckpt_dir, map_location=device).eval()
    check_fits(model, cfg.data.seq_len, str(ckpt_dir))
    all_linears = linear_names(model)
    prepared, loader = val_loader(cfg, log=log)
    log(f"quantize: {ckpt_dir} -> {out_dir} | {qc.method} | evaluating fp32 on the validation split")
    val_batches = qc.val_batches if qc.val_batches is not None else cfg.eval.val_batches
    fp = eval_loss(model, loader, val_batches, device)
    calib = None
    if qc.method == "int8_static":
        calib = calibration_batches(prepared.dir, qc.calib_examples, cfg.data.seq_len, device)
    layers = quantize_model(model, qc.method, qc.lm_head, qc.skip, calib)
    kernels = layer_kernels(model)
    q8 = eval_loss(model, loader, val_batches, device)
    save_quantized(model, layers, out_dir, qc.method)

    # the file must reproduce the model just evaluated: one batch, bit for bit
    reloaded = load_quantized(out_dir, device)
    x = next(iter(loader)).input_ids[:1, :32].to(device)
    with torch.no_grad():
        same = torch.equal(model(x), reloaded(x))
    if not same:
        raise QuantizationError(f"{out_dir}: the saved int8 model does not reproduce the quantized one")
    del model, reloaded

    rel = (q8["loss"] - fp["loss"]) / fp["loss"] if fp["loss"] > 0 else 0.0
    gate = qc.gate_rel_loss
    passed = gate is None or rel <= gate
    fp_bytes, q_bytes = checkpoint_bytes(ckpt_dir), checkpoint_bytes(out_dir)
    summary: dict[str, Any] = {
        "method": qc.method,
        "source_checkpoint": str(ckpt_dir),
        "quantized_checkpoint": str(out_dir),
        "torchao": torchao_api()["version"],
        "torch": torch.__version__,
        "device": device.type,
        "quantized_layers": len(layers),
        "linear_layers": len(all_linears),
        "layers": layers,
        "kernels": {n: kernels[n] for n in layers},
        "kept_floating_point": [n for n in all_linears if n not in layers]
        + ["transformer.wpe", "LayerNorms", "biases"]
        + ([] if "lm_head" in layers else ["transformer.wte (tied to lm_head)"]),
        "lm_head_quantized": "lm_head" in layers,
        "calibration_examples": len(calib) if calib is not None else None,
        "val": {
            "batches": fp["batches"],
            "tokens": fp["tokens"],
            "loss_fp32": fp["loss"],
            "loss_int8": q8["loss"],
            "perplexity_fp32": fp["perplexity"],
            "perplexity_int8": q8["perplexity"],
            "rel_loss_delta": rel,
        },
        "gate": {"rel_loss_max": gate, "passed": passed},
        "file_bytes": {"fp32": fp_bytes, "int8": q_bytes, "ratio": q_bytes / fp_bytes},
        "inference": None,
    }
    log(
        f"quantize: {len(layers)}/{len(all_linears)} Linear layers int8 | val loss fp32 {fp['loss']:.4f} "
        f"int8 {q8['loss']:.4f} ({rel:+.2%}) | file {fp_bytes / 2**20:.1f} MiB -> {q_bytes / 2**20:.1f} MiB "
        f"({q_bytes / fp_bytes:.1%})"
    )
    if qc.measure:
        opts = {
            "prompt_tokens": qc.measure_prompt_tokens, "new_tokens": qc.measure_new_tokens,
            "batch_sizes": qc.measure_batch_sizes, "repeats": qc.measure_repeats,
        }
        log(f"quantize: timing fp32 and int8 on {device.type} (one fresh process each)")
        inf = {"fp32": measure_in_subprocess(ckpt_dir, device, opts), "int8": measure_in_subprocess(out_dir, device, opts)}
        a, b = inf["fp32"], inf["int8"]
        inf["int8_vs_fp32"] = {
            "prefill_latency": b["prefill_ms_batch1"] / a["prefill_ms_batch1"],
            **{f"decode_tokens_per_s_batch{k}": b["decode_tokens_per_s"][k] / a["decode_tokens_per_s"][k] for k in a["decode_tokens_per_s"]},
            "peak_rss": b["peak_rss_bytes"] / a["peak_rss_bytes"],
            "peak_rss_above_baseline": b["peak_rss_above_baseline_bytes"] / a["peak_rss_above_baseline_bytes"],
        }
        summary["inference"] = inf
        log(
            "quantize: decode tokens/s "
            + ", ".join(f"batch {k}: fp32 {a['decode_tokens_per_s'][k]:.1f} int8 {b['decode_tokens_per_s'][k]:.1f}" for k in a["decode_tokens_per_s"])
            + f" | prefill ms fp32 {a['prefill_ms_batch1']:.1f} int8 {b['prefill_ms_batch1']:.1f}"
        )
    summary["wall_time_s"] = time.time() - started
    from .metrics import write_json_atomic

    summary_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, summary_path)
    log(f"quantize: wrote {out_dir} and {summary_path}")
    if not passed:
        raise QuantizationError(
            f"quantize.gate_rel_loss: int8 validation loss {q8['loss']:.4f} is {rel:.2%} above fp32's {fp['loss']:.4f}, "
            f"over the {gate:.2%} gate (figures in {summary_path}; the int8 checkpoint was kept for inspection)"
        )
    return summary


def quantize_after_training(cfg, run_dir: Path, log: Callable[..., None] = print) -> dict:
    """The end-of-training hook (rank 0): run_dir/checkpoint -> run_dir/checkpoint_int8 and
    run_dir/quant_summary.json."""
    run_dir = Path(run_dir)
    return run_quantize(cfg, run_dir / "checkpoint", run_dir / "checkpoint_int8", run_dir / QUANT_SUMMARY, log=log, overwrite=True)


# ------------------------------------------------------------ command-line entry points


def command_config(ckpt_dir: str | Path, config_path: str | None, overrides: list[str], need_data: bool = True):
    """The config of a `quantize` / `eval` / `generate` command: `--config` if given, else the
    run's resolved config.yaml next to the checkpoint (run_dir/checkpoint -> run_dir/config.yaml),
    else (generate only) the defaults; dotted overrides apply on top."""
    from .config import ConfigError, load_config

    read_meta(Path(ckpt_dir))  # a missing or broken checkpoint is the first thing to report
    if config_path is None:
        candidate = Path(ckpt_dir).parent / "config.yaml"
        if candidate.is_file():
            config_path = str(candidate)
        elif need_data:
            raise ConfigError(
                f"--config: no run config.yaml next to {ckpt_dir}; pass --config CFG (its data.* names the validation data)"
            )
    return load_config(config_path, overrides)


def quantize_command(
    checkpoint: str, out: str, config: str | None, overrides: list[str], method: str | None = None,
    device: str | None = None, summary: str | None = None, overwrite: bool = False, measure: bool | None = None,
) -> dict:
    """`distrib-gpt quantize`: the flags are shortcuts for quantize.* overrides."""
    extra = [f"quantize.method={method}"] * bool(method) + [f"quantize.device={device}"] * bool(device)
    if measure is False:
        extra.append("quantize.measure=false")
    cfg = command_config(checkpoint, config, [*overrides, *extra])
    summary_path = Path(summary) if summary else Path(out) / QUANT_SUMMARY
    return run_quantize(cfg, Path(checkpoint), Path(out), summary_path, overwrite=overwrite)


def eval_command(checkpoint: str, config: str | None, overrides: list[str], device: str = "cpu", as_json: bool = False) -> dict:
    """`distrib-gpt eval`: mean token loss and perplexity of any checkpoint on the validation split."""
    cfg = command_config(checkpoint, config, overrides)
    dev = resolve_device(device)
    meta = read_meta(Path(checkpoint))
    model = load_model(Path(checkpoint), dev)
    check_fits(model, cfg.data.seq_len, checkpoint)
    _, loader = val_loader(cfg, log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    result = eval_loss(model, loader, cfg.eval.val_batches, dev)
    result["checkpoint"] = str(checkpoint)
    result["method"] = meta.get("quantization", {}).get("method", meta.get("dtype", "fp32"))
    if as_json:
        print(json.dumps(result))
    else:
        print(
            f"{checkpoint} ({result['method']}) | val loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
            f"{result['tokens']:,} tokens in {result['batches']} batches"
        )
    return result


def _main(argv: list[str]) -> int:
    """`python -m distrib_gpt.quantize measure CKPT DEVICE OPTS_JSON` (internal: one model's
    timing and memory in a fresh process; prints one JSON line)."""
    if len(argv) != 4 or argv[0] != "measure":
        print("usage: python -m distrib_gpt.quantize measure CKPT DEVICE OPTS_JSON (internal; see distrib-gpt quantize)", file=sys.stderr)
        return 2
    result = measure_checkpoint(argv[1], argv[2], json.loads(argv[3]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
