"""Attention kernels for packed rows, where a token may only see its own document.

Training packs examples end to end into fixed-length rows. Given per-token document
ids (B, T), a query attends to a key only when the key is not later (causal) and both
belong to the same document. Two kernels compute exactly that:

- ``sdpa_mask``: ``F.scaled_dot_product_attention`` with a dense boolean (B, 1, T, T)
  mask. Always available, supports dropout; the reference the other kernel is tested
  against. The dense mask keeps SDPA off its flash kernel, and it costs B*T*T bytes.
- ``flex``: ``flex_attention`` with a document ``mask_mod`` and a ``BlockMask``, which
  skips the (query block, key block) tiles that are masked out entirely, so cost
  shrinks with the documents' lengths. It only runs fast compiled (torch.compile), so
  the first call per shape compiles for a while (seconds to tens of seconds on a CPU).
  It has no dropout, and on a CPU no backward (torch 2.13): there it serves inference only.

``torch.nn.attention.varlen.varlen_attn`` (cumulative sequence lengths) would be a third
choice, but it is a flash-attention kernel for CUDA only, and it is left out until it can
be tested on a GPU.

Without document ids the model skips this module's masks and calls SDPA with
``is_causal=True``, the fast path plain causal rows have always taken.

The mask is built once per forward (``document_mask``) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

# `auto` is resolved per device and per forward by resolve_backend.
BACKENDS = ("auto", "sdpa_mask", "flex")

# What `auto` picks on a CPU. Training needs a backward, which flex lacks there, and
# flex's forward was slower too. Measured: one attention call, fp32, B=4, T=256, 4
# documents per row, 2 cores shared with other jobs (best of 7 rounds, ms), as
# causal / sdpa_mask / flex: forward, 4 heads x 32 (quickstart): 3.3 / 3.5 / 7.9;
# forward, 12 heads x 64 (GPT-2 small): 7.0 / 5.4 / 38.4; forward+backward, the
# same two shapes, causal / sdpa_mask: 7.8 / 16.6 and 19.3 / 23.5. Flex also compiles
# for 1-15 s per new shape. Computing attention per example instead (each example's
# q/k/v gathered into length groups, is_causal SDPA per group, scattered back) was
# tried too: the gathers and the extra calls made it slower than the dense mask at the
# quickstart shape, so it was not kept.
_CPU_AUTO = "sdpa_mask"


@dataclass
class DocumentMask:
    """Which keys each query may see, in the form one backend wants."""

    backend: str  # "sdpa_mask" or "flex"
    mask: object  # sdpa_mask: bool tensor (B, 1, T, T); flex: a BlockMask


def resolve_backend(name: str, device: torch.device, dropout_p: float = 0.0) -> str:
    """The kernel to use for config value `name` ("auto" or a backend) on `device`.

    dropout_p is the attention dropout that will actually be applied (0 in eval mode):
    flex has none, so `auto` then falls back to sdpa_mask and an explicit `flex` fails.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "flex" and dropout_p > 0:
        raise ValueError("attention 'flex' has no dropout; set dropout to 0 or use attention 'sdpa_mask'")
    if name == "flex" and device.type == "cpu" and torch.is_grad_enabled():
        # torch's own error would come from deep inside the compiled call
        raise ValueError("attention 'flex' has no backward on a CPU; use 'sdpa_mask', or run under torch.no_grad()")
    if name != "auto":
        return name
    if dropout_p > 0:
        return "sdpa_mask"
    # On CUDA the block-sparse flex kernel skips the masked tiles that a dense mask
    # computes and throws away, and a dense mask also rules out SDPA's flash kernel;
    # flex is the documented way to do document masking there, so it is not measured.
    if device.type == "cuda":
        return "flex"
    return _CPU_AUTO


def document_mask(doc_ids: torch.Tensor, backend: str) -> DocumentMask:
    """The causal, same-document mask for doc_ids (B, T), built for `backend`."""
    B, T = doc_ids.shape
    if backend == "sdpa_mask":
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T): query x key
        return DocumentMask(backend, (same_doc & causal)[:, None])  # broadcast over heads
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        # H=None: the same mask for every head. Built eagerly, once per forward; the
        # block mask is small next to the attention itself.
        block_mask = create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)
        return DocumentMask(backend, block_mask)
    raise ValueError(f"document_mask: backend must be 'sdpa_mask' or 'flex', got {backend!r}")


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention of q, k, v (B, n_head, T, head_dim).

    mask None is plain causal attention (is_causal SDPA); otherwise the document mask.
    Every query sees at least itself, so no row of the softmax is empty.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if mask.backend == "sdpa_mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, dropout_p=dropout_p)
    if dropout_p > 0:
        raise ValueError("attention 'flex' has no dropout")
    return _flex_attention()(q, k, v, block_mask=mask.mask)


_compiled_flex = None  # flex_attention under torch.compile, built on first use


def _flex_attention():
    """flex_attention compiled, as the flex docs require: uncompiled it falls back to a
    slow reference that materializes the full score matrix.

    Inside a region torch.compile is already tracing (parallel.py compiles each block)
    the plain function is returned, for the outer compile to trace. Otherwise one
    torch.compile'd wrapper serves the process; it caches its graphs per input shape, so
    a new T compiles again (once). dynamic=False: after a second shape torch.compile would
    otherwise build one shape-generic kernel, and inductor's CPU code for a shape-generic
    flex kernel with a document mask does not compile (torch 2.13: "cur_qSplitSize8 was
    not declared"; tests/test_packing.py meets it with the epoch's smaller last batch).
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex
