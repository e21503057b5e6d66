"""Host -> device copies that never make the host wait for the GPU.

A plain `torch.tensor(data, device="cuda")` copies from pageable memory, which PyTorch follows with
a stream synchronisation: the host stalls until every kernel queued before the copy has run. That
one stall per step is what kept the host from preparing step N+1 while step N runs. Here data goes
through page-locked memory (PyTorch's caching host allocator keeps each buffer until the copy that
reads it has run) and is copied with non_blocking=True. On the CPU these are plain tensors.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A list (or numpy array) as a tensor on device, without a host-side wait."""
    pin = device.type == "cuda"
    if isinstance(data, np.ndarray):
        t = torch.from_numpy(data).to(dtype)
        t = t.pin_memory() if pin else t
    else:
        t = torch.tensor(data, dtype=dtype, pin_memory=pin)
    return t.to(device, non_blocking=True)


# Each array starts at a multiple of this many elements: Triton compiles one kernel variant per
# pointer alignment it sees, so unaligned views would cost a compilation on the GPU mid-run.
_ALIGN = 32


def int32_arrays_to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Several int32 arrays in one copy; returns device views shaped like the inputs. They are packed
    straight into page-locked memory (one host copy per step, not two); the gaps are never read."""
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.size // _ALIGN) * _ALIGN
    flat = torch.empty(total, dtype=torch.int32, pin_memory=device.type == "cuda")
    host = flat.numpy()
    for a, offset in zip(arrays, offsets):
        host[offset : offset + a.size] = a.reshape(-1)
    dev = flat.to(device, non_blocking=True)
    return [dev[offset : offset + a.size].view(a.shape) for a, offset in zip(arrays, offsets)]


class HostResult:
    """Device tensors copied back to the host asynchronously; `get()` waits for them."""

    def __init__(self, tensors: list[torch.Tensor]):
        cuda = bool(tensors) and tensors[0].is_cuda
        if cuda:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self._host, tensors):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = list(tensors), None

    def get(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        return self._host
