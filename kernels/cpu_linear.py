"""The CPU linear for the few rows of a decode step: cpu_linear.cpp, built for this machine on first use.

Up to MAX_ROWS rows it reads the weights once (MKL's small-M GEMMs re-read them every few rows: on a
2-core Xeon the 30 layers of SmolLM2-135M took 39 ms at 4 rows and 48 ms at 16, against 21 and 33 ms here;
BENCHMARKS.md). More rows, other dtypes, autograd and CUDA go to F.linear.

The extension is compiled with the machine's C++ compiler (torch.utils.cpp_extension, -O3
-march=native, OpenMP: ~12 s once, then loaded from torch's extension cache in well under a second).
Without a compiler, or with PAGED_BACKEND_CPU_LINEAR=0, every call goes to F.linear; the reason is
logged once.
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
_SOURCE = Path(__file__).with_name("cpu_linear.cpp")
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
    if os.environ.get("PAGED_BACKEND_CPU_LINEAR", "1") == "0":
        logger.info("CPU linear kernel disabled (PAGED_BACKEND_CPU_LINEAR=0): small batches use F.linear")
        return False
    from torch.utils import cpp_extension

    name = f"paged_backend_cpu_linear_{_cpu_tag()}"
    t0 = time.perf_counter()
    logger.info("loading the CPU linear kernel for small batches (the first time on a machine it is compiled: ~15 s)")
    try:
        module = cpp_extension.load(
            name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as exc:  # no compiler or ninja, or an unsupported platform
        logger.warning("CPU linear kernel unavailable, small batches use F.linear: %s", str(exc).splitlines()[0])
        return False
    logger.info("CPU linear kernel ready in %.1f s", time.perf_counter() - t0)
    return module


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) takes this kernel: fp32 CPU tensors, a contiguous [N, K] weight, at
    most MAX_ROWS rows of x, nothing that autograd must see."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
        and weight.dim() == 2 and weight.is_contiguous() and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
        and 0 < x.numel() <= MAX_ROWS * weight.shape[1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias, for inputs that `fits` (the caller checks)."""
    module = load()
    if module is None:
        return F.linear(x, weight, bias)
    y = module.small_rows_linear(x.reshape(-1, weight.shape[1]).contiguous(), weight)
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])
