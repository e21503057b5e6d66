"""Paged-attention kernels: Triton on CUDA tensors, the plain-torch twin (reference.py) on CPU tensors.

Public entry points (the contract in DESIGN.md):
    store_kv(key, value, kv_cache, slot_mapping)
    paged_attention(q, kv_cache, block_tables, seq_lens, query_start_loc, scale,
                    sliding_window=None, softcap=None, out=None, *, max_query_len=None, max_seq_len=None)
    copy_blocks(kv_caches, src, dst)

`impl="triton"` / `impl="reference"` forces an implementation. Triton on CPU tensors runs through
Triton's interpreter: the kernels module is then loaded a second time with TRITON_INTERPRET=1 set
while its decorators run (Triton decides interpreted-or-compiled when `@triton.jit` is applied), so
this works whatever was imported before and never changes how the GPU kernels are built.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading

import torch

from . import reference

__all__ = ["store_kv", "paged_attention", "copy_blocks", "reference"]

_IMPLS = ("triton", "reference")
_lock = threading.Lock()
_triton_modules: dict[bool, object] = {}


def _triton_module(interpret: bool):
    """The Triton implementation module, compiled (interpret=False) or interpreted (True); loaded once each."""
    mod = _triton_modules.get(interpret)
    if mod is not None:
        return mod
    with _lock:
        if interpret not in _triton_modules:
            if not interpret and os.environ.get("TRITON_INTERPRET") != "1":
                from . import triton_impl as mod
            else:
                # Import triton (and the gluon package it pulls in lazily at the first launch) in its
                # normal mode first, so only our kernels' decorators see the interpreter flag.
                import triton  # noqa: F401

                try:
                    import triton.experimental.gluon  # noqa: F401
                except ImportError:
                    pass
                name = f"{__name__}._triton_impl_interpreted"
                path = os.path.join(os.path.dirname(__file__), "triton_impl.py")
                spec = importlib.util.spec_from_file_location(name, path)
                mod = importlib.util.module_from_spec(spec)
                old = os.environ.get("TRITON_INTERPRET")
                os.environ["TRITON_INTERPRET"] = "1"
                try:
                    spec.loader.exec_module(mod)
                finally:
                    if old is None:
                        del os.environ["TRITON_INTERPRET"]
                    else:
                        os.environ["TRITON_INTERPRET"] = old
                sys.modules[name] = mod
            _triton_modules[interpret] = mod
    return _triton_modules[interpret]


def _pick(impl: str | None, t: torch.Tensor):
    """The module implementing the kernels for tensor t: triton_impl (compiled or interpreted) or reference."""
    if impl is None:
        impl = "triton" if t.is_cuda else "reference"
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {_IMPLS} or None (CUDA -> triton, CPU -> reference)")
    if impl == "reference":
        return reference
    return _triton_module(interpret=not t.is_cuda)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    impl: str | None = None,
) -> None:
    """Write key/value [T, Hkv, D] into kv_cache [num_blocks, 2, block_size, Hkv, D] at slot_mapping [T]; -1 skips."""
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be [T, Hkv, D]")
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or tuple(kv_cache.shape[3:]) != tuple(key.shape[1:]):
        raise ValueError(
            f"kv_cache {tuple(kv_cache.shape)} must be [num_blocks, 2, block_size, Hkv, D] with "
            f"Hkv, D = {tuple(key.shape[1:])} from key"
        )
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [T] with T = {key.shape[0]}")
    _pick(impl, kv_cache).store_kv(key, value, kv_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Causal varlen attention of q [T, Hq, D] over the paged cache -> [T, Hq, D] (written into `out` if given).

    max_query_len / max_seq_len are host ints the caller already knows; passing them keeps the
    launch free of device->host syncs. When None they are computed from the tensors. Both must be
    upper bounds (>=) of the true maxima; max_query_len == 1 selects the decode path (and, with few
    sequences, the split-K path, whose chunking is sized from max_seq_len). A CUDA graph captured for
    decode bakes the split count in: capture it with max_seq_len = the largest context it will replay
    with (e.g. max_model_len).
    """
    if q.dim() != 3 or kv_cache.dim() != 5 or q.shape[2] != kv_cache.shape[4]:
        raise ValueError(
            f"q {tuple(q.shape)} must be [T, Hq, D] and kv_cache {tuple(kv_cache.shape)} "
            "[num_blocks, 2, block_size, Hkv, D] with the same D"
        )
    if q.shape[1] % kv_cache.shape[3]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={kv_cache.shape[3]}")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} must be [B+1] and block_tables "
            f"{tuple(block_tables.shape)} [B, max_blocks] for seq_lens {tuple(seq_lens.shape)}"
        )
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match q {tuple(q.shape)} {q.dtype}")
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    if softcap is not None and softcap <= 0:
        softcap = None
    mod = _pick(impl, q)
    if mod is reference:
        return reference.paged_attention(
            q, kv_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, softcap, out
        )
    return mod.paged_attention(
        q,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        sliding_window,
        softcap,
        out,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
    )


def copy_blocks(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole block src[i] to dst[i] in every layer's cache (copy-on-write). Same torch code on every device."""
    if src.shape != dst.shape:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must have the same length")
    if kv_caches:
        reference.copy_blocks(kv_caches, src, dst)
