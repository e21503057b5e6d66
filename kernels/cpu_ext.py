"""The project's CPU kernels, one C++ extension built for this machine on first use: fp32 only.

- cpu_linear.cpp: the linear for the few rows of a decode step. Up to MAX_ROWS rows it reads the weights
  once (MKL's small-M GEMMs re-read them every few rows: on a 2-core Xeon the 30 layers of SmolLM2-135M
  took 39 ms at 4 rows and 48 ms at 16, against 21 and 33 ms here; BENCHMARKS.md). More rows, other
  dtypes, autograd and CUDA go to F.linear.
- cpu_fused.cpp: RMSNorm (+ residual), the gated activations silu and gelu_tanh, the neox rotary, one
  pass each instead of torch's 3-8 ops.
- cpu_attention.cpp: decode attention over the padded decode batch (no window, no soft-cap), each
  sequence's K and V read from memory once for the query heads that share them.
- cpu_prefill.cpp: causal attention of a prompt (chunk) against its sequence's keys, only the triangle
  below the diagonal (torch's flash SDPA computes whole blocks and masks them).
- cpu_sampling.cpp: the greedy choice and its log-probability, two passes over each row of logits
  (torch: argmax, then a logsumexp of four ops).
(cpu_vec.h: their shared vector type, lane sums and exp.)

The extension is compiled with the machine's C++ compiler (torch.utils.cpp_extension, -O3
-march=native, OpenMP: 10-30 s once, then loaded from torch's extension cache in well under a second).
Without a compiler, or with PAGED_BACKEND_CPU_KERNELS=0, everything runs as before (F.linear and the
reference ops); the reason is logged once. PAGED_BACKEND_CPU_ARCH (default native) is the -march target:
the tests also build x86-64-v3 (AVX2, 8 lanes) and x86-64 (the 4-lane path that NEON machines take).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("paged_backend")

MAX_ROWS = 64  # past ~64-96 rows MKL's blocked GEMM is faster (BENCHMARKS.md)
_NOTICE_AFTER_S = 2.0  # a load that takes longer is a compile: say so
_SOURCES = [str(Path(__file__).with_name(f))
            for f in ("cpu_module.cpp", "cpu_linear.cpp", "cpu_fused.cpp", "cpu_attention.cpp", "cpu_prefill.cpp",
                      "cpu_sampling.cpp")]
_lock = threading.Lock()
_module = None  # the loaded extension; False once loading failed or is disabled


def _cpu_tag() -> str:
    """The CPU the build targets (-march=native): a home directory shared by machines of different
    CPUs must not load a build with instructions another one lacks."""
    desc = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            desc += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(desc.encode()).hexdigest()[:10]


def load():
    """The extension, built on first use (None when unavailable: the calls then use F.linear)."""
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                _module = _build()
    return _module or None


def _build():
    if os.environ.get("PAGED_BACKEND_CPU_KERNELS", "1") == "0":
        logger.info("CPU kernels disabled (PAGED_BACKEND_CPU_KERNELS=0): F.linear and torch's ops instead")
        return False
    from torch.utils import cpp_extension

    arch = os.environ.get("PAGED_BACKEND_CPU_ARCH", "native")  # e.g. x86-64-v3: an AVX2-only build (tests)
    name = f"paged_backend_cpu_{_cpu_tag()}_{arch.replace('-', '_')}"
    t0 = time.perf_counter()
    # A cached build loads in well under a second; only a compile (first run on a machine) is announced,
    # at warning level so that it shows without any logging set up: nothing stays silent for ~20 s.
    notice = threading.Timer(_NOTICE_AFTER_S, logger.warning,
                             ("compiling the CPU kernels for this machine (once, 10-30 s; cached afterwards)",))
    notice.daemon = True
    notice.start()
    try:
        module = cpp_extension.load(
            name=name, sources=_SOURCES, extra_cflags=["-O3", f"-march={arch}", "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as exc:  # no compiler or ninja, or an unsupported platform
        logger.warning("CPU kernels unavailable, F.linear and torch's ops instead: %s", str(exc).splitlines()[0])
        return False
    finally:
        notice.cancel()
    elapsed = time.perf_counter() - t0
    (logger.warning if elapsed > _NOTICE_AFTER_S else logger.info)("CPU kernels ready in %.1f s", elapsed)
    return module


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors that autograd need not see (the kernels have no backward). (A plain loop: this runs
    ~300 times a decode step, and a generator with `device.type` took 3x as long.)"""
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu:
            return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def fits_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) takes this kernel: fp32 CPU tensors, a contiguous [N, K] weight, at
    most MAX_ROWS rows of x."""
    return (
        _fp32_cpu(x, weight) and weight.dim() == 2 and weight.is_contiguous() and x.dim() >= 1
        and x.shape[-1] == weight.shape[1] and 0 < x.numel() <= MAX_ROWS * weight.shape[1]
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias, for inputs that `fits_linear` (the caller checks)."""
    module = load()
    if module is None:
        return F.linear(x, weight, bias)
    y = module.small_rows_linear(x.reshape(-1, weight.shape[1]).contiguous(), weight)
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- element-wise ops: None when the kernels do not take these inputs (the caller runs the reference) ----
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, gemma: bool):
    """The reference's rms_norm (without fp8_out) for contiguous fp32 x, weight and residual."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if not (_fp32_cpu(*tensors) and all(t.is_contiguous() for t in tensors) and x.numel()):
        return None
    module = load()
    if module is None:
        return None
    out, total = module.rms_norm(x, weight, eps, residual, gemma)
    return out if residual is None else (out, total)


def gated_activation(x: torch.Tensor, activation: str):
    """act(gate) * up (silu or gelu_tanh) for contiguous fp32 x = cat(gate, up)."""
    if activation not in ("silu", "gelu_tanh") or not (_fp32_cpu(x) and x.is_contiguous() and x.numel()):
        return None
    module = load()
    return None if module is None else module.gated_activation(x, activation)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The neox rotation of fp32 x [T, H, D] (D contiguous) by contiguous fp32 cos / sin [T, D/2]."""
    if not (_fp32_cpu(x, cos, sin) and x.stride(2) == 1 and cos.is_contiguous() and sin.is_contiguous()
            and x.numel()):
        return None
    module = load()
    return None if module is None else module.rotary(x, cos, sin)


def _attention_module(head_dim: int):
    """The extension when it has attention kernels for this head size (4, 8 or 16 vectors), else None."""
    module = load()
    return module if module is not None and head_dim in module.ATTENTION_HEAD_DIMS else None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: torch.Tensor, scale: float):
    """softmax(scale q k^T) v of q [B, Hkv, G, D] against the first ctx[b] keys of k, v [B, S, Hkv, D]
    (fp32, D contiguous) -> [B, Hkv, G, D]; None for head sizes the build has no kernel for."""
    if not (_fp32_cpu(q, k, v) and k.stride(3) == 1 and v.stride(3) == 1 and q.numel()):
        return None
    module = _attention_module(q.shape[3])
    if module is None:
        return None
    return module.decode_attention(q.contiguous(), k, v, ctx.reshape(-1).to(torch.int64), scale)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Causal softmax(scale q k^T) v of q [M, Hq, D], the last M positions of a sequence, against its keys
    k, v [S, Hkv, D] (fp32, D contiguous) -> [M, Hq, D]; None for head sizes the build has no kernel for."""
    if not (_fp32_cpu(q, k, v) and k.stride(2) == 1 and v.stride(2) == 1 and q.numel()
            and q.shape[1] % k.shape[1] == 0 and k.shape[0] >= q.shape[0]):
        return None
    module = _attention_module(q.shape[2])
    if module is None:
        return None
    m, hq, d = q.shape
    hkv = k.shape[1]
    out = module.prefill_attention(q.contiguous().view(m, hkv, hq // hkv, d), k, v, scale)
    return out.view(m, hq, d)


def greedy_sample(logits: torch.Tensor):
    """(argmax [N] int64, its log-probability [N] fp32) of contiguous fp32 logits [N, V], or None (the caller
    runs the reference) when the kernels are unavailable or a row holds a NaN or an infinity."""
    if not (_fp32_cpu(logits) and logits.is_contiguous() and logits.numel()):
        return None
    module = load()
    if module is None:
        return None
    ids, logprobs = module.greedy_sample(logits)
    return None if torch.isnan(logprobs).any() else (ids, logprobs)
