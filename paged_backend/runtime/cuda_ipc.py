"""Device memory shared between the processes of one host: CUDA IPC through the CUDA runtime library
that torch itself loaded (found in /proc/self/maps, so it is the very same runtime and context).

Why not torch's own tensor sharing (`torch.multiprocessing.reductions.reduce_tensor` / rebuild):
it opens a peer's memory on the *peer's* device index (a second context, on the peer's GPU, in this
process, instead of a mapping into our own device's address space), keeps the sender's block alive
until every receiver process has decremented a shared counter (a receiver that died never does: the
memory would stay allocated until exit) and caches opened handles process-wide. Here a region is one
plain cudaMalloc, exported with cudaIpcGetMemHandle, opened by each peer in its own device's context
with lazy peer access, and closed and freed by its owner at release: nothing outlives the engine.
"""

from __future__ import annotations

import ctypes
import functools
import os

_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # cudaIpcMemHandle_t, passed by value


_SIGNATURES = {
    "cudaSetDevice": [ctypes.c_int],
    "cudaMalloc": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t],
    "cudaFree": [ctypes.c_void_p],
    "cudaMemset": [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t],
    "cudaDeviceSynchronize": [],
    "cudaIpcGetMemHandle": [ctypes.POINTER(_IpcHandle), ctypes.c_void_p],
    "cudaIpcOpenMemHandle": [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint],
    "cudaIpcCloseMemHandle": [ctypes.c_void_p],
}


class CudaRuntime:
    """The few runtime calls device-memory sharing needs; every failure raises RuntimeError."""

    def __init__(self, path: str):
        self.path = path
        self._lib = lib = ctypes.CDLL(path)
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p

    def _call(self, name: str, *args) -> None:
        err = getattr(self._lib, name)(*args)
        if err != 0:
            raise RuntimeError(f"{name} failed: {self._lib.cudaGetErrorString(err).decode()} (cudaError {err})")

    def malloc_zeroed(self, device: int, nbytes: int) -> int:
        """nbytes of device memory on `device`, zeroed, the zeros written before this returns."""
        self._call("cudaSetDevice", device)
        ptr = ctypes.c_void_p()
        self._call("cudaMalloc", ctypes.byref(ptr), nbytes)
        try:
            self._call("cudaMemset", ptr, 0, nbytes)
            self._call("cudaDeviceSynchronize")  # a peer may write into it as soon as it has the handle
        except RuntimeError:
            self._call("cudaFree", ptr)
            raise
        return ptr.value

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ctypes.c_void_p(ptr))

    def export(self, ptr: int) -> bytes:
        """The IPC handle of an allocation (its base address), as bytes another process can open."""
        handle = _IpcHandle()
        self._call("cudaIpcGetMemHandle", ctypes.byref(handle), ctypes.c_void_p(ptr))
        return bytes(handle.reserved)

    def open(self, device: int, handle: bytes) -> int:
        """Another process's allocation mapped into `device`'s address space (peer access enabled)."""
        self._call("cudaSetDevice", device)
        ptr = ctypes.c_void_p()
        self._call("cudaIpcOpenMemHandle", ctypes.byref(ptr), _IpcHandle.from_buffer_copy(handle),
                   _LAZY_ENABLE_PEER_ACCESS)
        return ptr.value

    def close(self, ptr: int) -> None:
        self._call("cudaIpcCloseMemHandle", ctypes.c_void_p(ptr))


@functools.lru_cache(maxsize=None)
def loaded_runtime() -> CudaRuntime | None:
    """The libcudart this process has loaded (torch's, once CUDA is initialised), or None where there
    is none to find (a torch with the runtime linked in statically, a system without /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libcudart.so"):
                    return CudaRuntime(parts[5].strip())
    except OSError:
        return None
    return None
