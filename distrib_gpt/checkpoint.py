"""Consolidated checkpoints: safetensors weights plus the model's config.

Layout of a checkpoint directory:

    model.safetensors   every tensor of the plain model (no wrapper prefixes); the LM head
                        is tied to the token embedding, so only `transformer.wte.weight` is
                        stored and the tie is restored on load
    config.json         the GPTConfig fields, plus the dtype the tensors were written in

Writes go to a temporary sibling directory that is renamed into place, so a crash never
leaves a half-written checkpoint under the final name. Loading uses safetensors only: no
pickle, so a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED = "lm_head.weight"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of another shape; the message names the file."""


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `out_dir`, on
    failure it is removed, so `out_dir` is never seen half-written."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_consolidated(model: GPT, out_dir: Path, dtype: str = "fp32") -> Path:
    """Write `model` to `out_dir` atomically; returns the directory."""
    with atomic_dir(out_dir) as tmp:
        state = {
            k: v.detach().to(device="cpu", dtype=DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous()
            for k, v in model.state_dict().items()
            if k != TIED
        }
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "distrib_gpt": "1"})
        meta = {"model": dataclasses.asdict(model.config), "dtype": dtype, "tied": {TIED: "transformer.wte.weight"}}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


def load_consolidated(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> GPT:
    """Rebuild a GPT from a consolidated checkpoint directory (fp32 parameters)."""
    ckpt_dir = Path(ckpt_dir)
    cfg_path, weights_path = ckpt_dir / CONFIG, ckpt_dir / WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: checkpoint file not found")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        config = GPTConfig(**meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not a distrib_gpt checkpoint config ({e})") from None
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: corrupt or truncated safetensors file ({e})") from None
    model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: keys do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointError(f"{weights_path}: {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(shape)}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte
    return model.to(map_location)


# ----------------------------------------------------------------------------------------
# Sharded, resumable checkpoints (torch.distributed.checkpoint)
#
#   run_dir/checkpoints/
#       step_00000120/
#           .metadata, __<rank>_0.distcp   model + AdamW state, each rank writing its shards
#           rng_rank<r>.safetensors        every rank's RNG state
#           trainer_state.json             step, data position, scaler, loss history, config
#       latest                             the name of the newest complete checkpoint
#
# A save is written under `.tmp-step_...`, renamed into place when every rank has finished,
# and only then does `latest` move (itself replaced atomically), so a save killed halfway
# leaves the previous checkpoint and `latest` intact; the partial directory is removed on
# the next start. State-dict keys are the plain model's (no DDP/FSDP/compile prefixes), so a
# checkpoint saved under one strategy and world size loads under another.


try:
    from torch.distributed.checkpoint.api import CheckpointException

    # CheckpointException derives from BaseException, so `except Exception` misses it
    _DCP_ERRORS: tuple[type[BaseException], ...] = (Exception, CheckpointException)
except ImportError:  # pragma: no cover
    _DCP_ERRORS = (Exception,)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CKPT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class _SafeMetadataUnpickler(pickle.Unpickler):
    """DCP stores its `.metadata` as a pickle. Unpickling an untrusted pickle can run any
    code, so only the plain data classes DCP's metadata is made of are allowed through."""

    _ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str) -> Any:
        obj = None
        if (module, name) in self._ALLOWED:
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = super().find_class(module, name)
        elif module.startswith("torch.distributed.checkpoint."):
            candidate = super().find_class(module, name)
            if isinstance(candidate, type):  # data classes and enums, never functions
                obj = candidate
        if obj is None:
            raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never contains")
        return obj


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader that unpickles metadata with an allowlist and refuses pickled
        (non-tensor) items; tensors are read with torch.load(weights_only=True) by DCP."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            meta_path = Path(self.path) / ".metadata"
            try:
                data = meta_path.read_bytes()
            except OSError as e:
                raise CheckpointError(f"{meta_path}: cannot read checkpoint metadata ({e})") from None
            try:
                metadata = _SafeMetadataUnpickler(io.BytesIO(data)).load()
            except CheckpointError as e:
                raise CheckpointError(f"{meta_path}: refused: {e}") from None
            except Exception as e:  # truncated or garbage bytes
                raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata ({type(e).__name__}: {e})") from None
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{meta_path}: not a torch.distributed.checkpoint metadata file")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
                raise CheckpointError(f"{self.path}: checkpoint holds pickled objects; refusing to load them")
            return super().read_data(plan, planner)

    return SafeFileSystemReader(str(path))


def _tensor_only(optim_sd: dict) -> dict:
    """The optimizer state without param_groups (lr, betas... come from the config), so the
    checkpoint holds nothing but tensors and never needs unpickling."""
    return {"state": optim_sd["state"]}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores sharded training state under `run_dir/checkpoints`."""

    def __init__(self, run_dir: Path, keep_last: int, rank: int, world_size: int, device: torch.device,
                 adapters_only: bool = False):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.device = device
        # LoRA's lora.save_adapters_only: leave the frozen base weights out of the saves
        # (resume rebuilds them from model.init); DCP's ignore_frozen_params does the filtering
        self.adapters_only = adapters_only

    # ---------------------------------------------------------------- discovery

    def clean_partial(self) -> list[Path]:
        """Remove saves that never completed (call on rank 0 before anything else)."""
        removed = []
        if self.dir.is_dir():
            for d in self.dir.iterdir():
                if d.name.startswith(TMP_PREFIX):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
        return removed

    def latest(self) -> Optional[Path]:
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text(encoding="utf-8").strip()
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"{pointer}: points to {path.name}, which is not a complete checkpoint")
        return path

    # ---------------------------------------------------------------- save

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict, step: int, barrier) -> Path:
        """Every rank calls this. Returns the published checkpoint directory."""
        import torch.distributed.checkpoint as dcp

        name = f"{CKPT_PREFIX}{step:08d}"
        tmp, final = self.dir / f"{TMP_PREFIX}{name}", self.dir / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        if _is_zero(optimizer):
            # ZeroRedundancyOptimizer is not handled by DCP's state_dict helpers: the model
            # goes through DCP, and each rank keeps its own optimizer partition in a file
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            dcp.save({"model": self._model_sd(get_model_state_dict(model, options=self._options()))},
                     checkpoint_id=str(tmp), no_dist=_no_dist())
            save_file(_flatten_optim(optimizer.optim.state_dict()), str(tmp / f"optim_rank{self.rank}.safetensors"))
        else:
            model_sd, optim_sd = model_and_optim_state(model, optimizer, self._options())
            dcp.save({"model": self._model_sd(model_sd), "optim": _tensor_only(optim_sd)}, checkpoint_id=str(tmp), no_dist=_no_dist())
        save_file(_rng_state(self.device), str(tmp / f"rng_rank{self.rank}.safetensors"))
        barrier()  # every rank's shards and RNG state are on disk
        if self.rank == 0:
            _write_json({**trainer_state, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, tmp / TRAINER_STATE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.dir / f"{TMP_PREFIX}{LATEST}"
            pointer_tmp.write_text(name + "\n", encoding="utf-8")
            os.replace(pointer_tmp, self.dir / LATEST)
            self._prune(keep=final)
        barrier()  # nobody reads `latest` before it moved
        return final

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # strict=False with adapters only: the frozen weights are absent from the save on purpose
        return StateDictOptions(ignore_frozen_params=self.adapters_only, strict=not self.adapters_only)

    def _model_sd(self, model_sd: dict) -> dict:
        # ignore_frozen_params walks named_parameters(), which lists a shared Parameter once,
        # so the tied LM head (frozen under LoRA) would still be saved under its second name
        return {k: v for k, v in model_sd.items() if k != TIED} if self.adapters_only else model_sd

    def _prune(self, keep: Path) -> None:
        done = sorted(d for d in self.dir.iterdir() if d.name.startswith(CKPT_PREFIX) and d.is_dir())
        for d in done[: max(len(done) - self.keep_last, 0)]:
            if d != keep:
                shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------- load

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Every rank calls this: restores model, optimizer and this rank's RNG state (when the
        world size is unchanged); returns the trainer state."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        state_path = path / TRAINER_STATE
        try:
            trainer_state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{state_path}: unreadable trainer state ({e})") from None
        zero = _is_zero(optimizer)
        if zero:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

            optim_file = path / f"optim_rank{self.rank}.safetensors"
            if trainer_state.get("strategy") != "zero1" or trainer_state.get("world_size") != self.world_size:
                raise CheckpointError(
                    f"{path}: a zero1 run resumes only from a zero1 checkpoint of the same world size "
                    f"(this one: {trainer_state.get('strategy')} on {trainer_state.get('world_size')} ranks)"
                )
            state = {"model": self._model_sd(get_model_state_dict(model, options=self._options()))}
        else:
            model_sd, optim_sd = model_and_optim_state(model, optimizer, self._options())
            state = {"model": self._model_sd(model_sd), "optim": _tensor_only(optim_sd)}
        try:
            dcp.load(state, storage_reader=_safe_reader(path), no_dist=_no_dist())
        except CheckpointError:
            raise
        except _DCP_ERRORS as e:  # DCP wraps shape/key mismatches in its own exception
            raise CheckpointError(f"{path}: does not fit this model/optimizer ({_dcp_reason(e)})") from None
        if zero:
            set_model_state_dict(model, state["model"], options=self._options())
            current = optimizer.optim.state_dict()
            try:
                saved = load_file(str(optim_file))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{optim_file}: unreadable optimizer partition ({e})") from None
            optimizer.optim.load_state_dict({"state": _unflatten_optim(saved), "param_groups": current["param_groups"]})
        else:
            set_model_and_optim_state(model, optimizer, state["model"], {**optim_sd, "state": state["optim"]["state"]}, self._options())
        rng = path / f"rng_rank{self.rank}.safetensors"
        if trainer_state.get("world_size") == self.world_size and rng.is_file():
            saved = load_file(str(rng))
            torch.set_rng_state(saved["torch_cpu"])
            if "torch_cuda" in saved and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved["torch_cuda"], self.device)
        return trainer_state


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _flatten_optim(sd: dict) -> dict[str, torch.Tensor]:
    """{"state": {index: {name: tensor}}} -> {"index.name": tensor} for safetensors."""
    return {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}


def _unflatten_optim(flat: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        out.setdefault(int(i), {})[name] = v
    return out


def _no_dist() -> bool:
    import warnings

    import torch.distributed as dist

    no_dist = not (dist.is_available() and dist.is_initialized())
    if no_dist:  # we pass no_dist=True ourselves; DCP still warns that it is assuming so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    return no_dist


def _dcp_reason(e: BaseException) -> str:
    """DCP's CheckpointException carries each rank's failure; show the first cause's message."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))
        if isinstance(e, tuple):  # (exception, traceback) on some versions
            e = e[0]
    text = str(e).strip().splitlines()
    for line in reversed(text):  # the cause is the last line of a wrapped traceback
        if "Error:" in line or "mismatch" in line:
            return line.strip()
    return text[-1].strip() if text else type(e).__name__


def model_and_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, options=None) -> tuple[dict, dict]:
    """FQN-keyed model and optimizer state dicts, wrappers stripped (DDP, FSDP2 DTensors stay
    sharded so each rank saves only its part)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=options)


def set_model_and_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict,
                              options=None) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """`resume=auto`: the run's latest checkpoint, or None to start fresh. `resume=PATH`: a
    checkpoint directory, or a run directory / checkpoints directory holding `latest`."""
    if resume is None:
        return None
    if resume == "auto":
        return Checkpointer(run_dir, 1, 0, 1, torch.device("cpu")).latest()
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        return path
    for pointer_dir in (path, path / "checkpoints"):
        if (pointer_dir / LATEST).is_file():
            return Checkpointer(pointer_dir.parent if pointer_dir.name == "checkpoints" else path, 1, 0, 1, torch.device("cpu")).latest()
    raise CheckpointError(f"{path}: not a checkpoint (no {TRAINER_STATE}) nor a run with checkpoints/{LATEST}")


def load_sharded_model(path: Path) -> GPT:
    """The plain model from a sharded checkpoint, in this one process (no process group)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    try:
        trainer_state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        config = GPTConfig(**trainer_state["model_config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / TRAINER_STATE}: not a distrib_gpt sharded checkpoint ({e})") from None
    model = GPT(config)
    lora = trainer_state.get("lora")
    if lora:
        from .config import LoRAConfig
        from .lora import apply_lora, merge_into

        if lora.get("save_adapters_only"):
            raise CheckpointError(
                f"{path}: holds LoRA adapters only (lora.save_adapters_only), not the base weights; "
                "use the run's merged checkpoint/ or its adapter/ with the base model"
            )
        apply_lora(model, LoRAConfig(**lora))
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, storage_reader=_safe_reader(path), no_dist=_no_dist())
    except CheckpointError:
        raise
    except _DCP_ERRORS as e:
        raise CheckpointError(f"{path}: does not fit the model its trainer_state.json describes ({_dcp_reason(e)})") from None
    model.load_state_dict(state["model"])
    return merge_into(model) if lora else model


def save_adapter(adapters: dict[str, torch.Tensor], cfg, out_dir: Path) -> Path:
    """LoRA adapters alone (`adapter.safetensors`) and what they adapt (`adapter_config.json`:
    the lora section and the base model), written atomically. Merged weights are in checkpoint/."""
    with atomic_dir(out_dir) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapters.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "distrib_gpt": "1"})
        meta = {"lora": dataclasses.asdict(cfg.lora), "base_model": dataclasses.asdict(cfg.model)}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)


def consolidated_dir(path: str | Path) -> Path:
    """The consolidated checkpoint (fp or int8) that `path` names on a command line: the
    directory itself, or a run directory's `checkpoint/`. Every command that takes
    `--checkpoint` resolves it here, so all of them accept a run directory."""
    path = Path(path)
    if not (path / CONFIG).is_file() and not (path / WEIGHTS).is_file() and (path / "checkpoint" / WEIGHTS).is_file():
        return path / "checkpoint"
    return path


def load_any(path: Path) -> GPT:
    """A consolidated (safetensors) or sharded (DCP) checkpoint, or a run directory (its
    consolidated `checkpoint/`, else its latest sharded checkpoint)."""
    path = consolidated_dir(path)
    if (path / WEIGHTS).is_file() or (path / CONFIG).is_file():
        return load_consolidated(path)
    if (path / TRAINER_STATE).is_file():
        return load_sharded_model(path)
    resumed = resolve_resume(str(path), path) if path.exists() else None
    if resumed is not None:
        return load_sharded_model(resumed)
    raise CheckpointError(f"{path}: no checkpoint found (expected {WEIGHTS}, {TRAINER_STATE} or a run directory)")


def export_hf(model: GPT, out_dir: Path) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory (`GPT2LMHeadModel.from_pretrained`
    loads it): Linear weights transposed back to HF's Conv1D layout, pad rows dropped."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_cfg = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new",
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, bos_token_id=50256, eos_token_id=50256,
        tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(hf_cfg)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    src = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k != TIED}
    src["transformer.wte.weight"] = src["transformer.wte.weight"][: c.vocab_size]
    dst = {}
    for k, v in src.items():
        dst[k] = v.t().contiguous() if k.endswith(conv1d) else v
    missing, unexpected = hf.load_state_dict(dst, strict=False)
    missing = [k for k in missing if k != TIED and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise CheckpointError(f"export-hf: keys do not map (missing {missing[:3]}, unexpected {unexpected[:3]})")
    hf.tie_weights()
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)
