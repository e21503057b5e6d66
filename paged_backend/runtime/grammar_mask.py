"""The step's grammar bitmask: a host buffer the engine fills, applied to the logits on their device.

The bitmask has one int32 row per logits row (one bit per token of the model's vocabulary, padded
ids included, 1 = allowed); only the constrained rows are filled and applied. On a GPU the buffer is
page-locked memory from PyTorch's caching host allocator: the copy to the device then never makes
the host wait for the GPU (a copy from pageable memory would wait for the forward pass in flight,
and the host would stop preparing the next step), and a buffer is handed out again only once the
copy that read it has run. xgrammar's kernel applies it on the GPU. On the CPU, xgrammar's kernel
writes -inf token by token (seconds for a large batch of rows that allow a few tokens of a 128k
vocabulary), so rows are done a whole row at a time there (see `_apply_on_cpu`).
"""

from __future__ import annotations

import numpy as np
import torch
import xgrammar as xgr


class GrammarMasks:
    def __init__(self):
        self._cpu: torch.Tensor | None = None  # reused: on the CPU a step's mask is applied at once

    def buffer(self, num_rows: int, width: int, device: torch.device) -> torch.Tensor:
        """An int32 [num_rows, width] host tensor for the engine to fill (rows left unfilled are
        not read)."""
        if device.type == "cuda":
            return torch.empty((num_rows, width), dtype=torch.int32, pin_memory=True)
        if self._cpu is None or self._cpu.shape[0] < num_rows or self._cpu.shape[1] != width:
            self._cpu = torch.empty((num_rows, width), dtype=torch.int32)
        return self._cpu[:num_rows]


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Set to -inf every token of logits[r] that bitmask[r] forbids, for r in rows (in place;
    returns logits). bitmask is on the host, int32 [>= max(rows) + 1, ceil(vocab / 32)]."""
    if logits.device.type == "cpu":
        _apply_on_cpu(logits, bitmask.numpy(), rows)
        return logits
    device = logits.device
    mask = bitmask[: max(rows) + 1].to(device, non_blocking=True)  # page-locked: see GrammarMasks
    # Triton compiles a kernel per class of the row count (1, multiples of 16, others): padded
    # (a row masked twice is masked the same) it is always one class, compiled by the first step,
    # never mid-run when the batch first reaches a multiple of 16.
    padded = rows + rows[-1:] * (-len(rows) % 16)
    index = torch.tensor(padded, dtype=torch.int32, pin_memory=device.type == "cuda").to(device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=logits.shape[1], indices=index)
    return logits


def _apply_on_cpu(logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> None:
    """A row that allows fewer than half the vocabulary keeps its allowed logits and is otherwise
    filled with -inf; any other row gets -inf at its forbidden ids. Either way the few ids are found
    from the nonzero 32-bit words, never by testing every token in Python or bit by bit."""
    vocab = logits.shape[1]
    rows_np = np.asarray(rows, dtype=np.int64)
    words = bitmask[rows_np].view(np.uint32)
    allowed = np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    sparse = allowed * 2 < vocab
    for keep, sel in ((True, sparse), (False, ~sparse)):
        if not sel.any():
            continue
        target = rows_np[sel]
        w = words[sel] if keep else ~words[sel]
        r, c = np.nonzero(w)
        bits = np.unpackbits(w[r, c].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        k, bit = np.nonzero(bits)
        ids = c[k] * 32 + bit
        inside = ids < vocab  # (the last word's padding bits)
        index = (torch.from_numpy(target[r[k]][inside]), torch.from_numpy(ids[inside]))
        if keep:
            kept = logits[index]
            logits.index_fill_(0, torch.from_numpy(target), float("-inf"))
            logits.index_put_(index, kept)
        else:
            logits.index_put_(index, torch.tensor(float("-inf"), dtype=logits.dtype))
