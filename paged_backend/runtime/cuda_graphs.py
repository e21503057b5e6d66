"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured at start-up.

A decode-only step (every sequence adds one token) launches the same kernels every time; only
the contents of a few small tensors change. Each graph reads its inputs from one static int32
buffer that `load` fills with a single host-to-device copy: per row the input id, position, cache
slot, context length and pending-token source, then the block tables. A pending token (sampled by
the previous step, never read back by the host) is gathered inside the graph from `prev_tokens`.
Attention in a graph is launched for the longest possible context (max_model_len), and the kernel
reads each sequence's real length, so one graph serves every context length. Padded rows write
nowhere (slot -1) and are never read back.

With `sample` (one GPU: no tensor parallelism) a graph also runs the LM head and the greedy choice:
a greedy step then costs the host one replay and one copy back, and the chosen ids stay in
`prev_tokens` for the next step. Its logits are copied into one static buffer shared by every batch
size, for the steps that sample otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from paged_backend import kernels
from paged_backend.layers.attention import AttentionMetadata
from paged_backend.runtime.step_input import StepInput, table_width

logger = logging.getLogger("paged_backend")

_ROWS = 5  # ids, positions, slots, seq_lens, pending source (-1: none) per row, then the block tables
_PADDED_ROW = np.array([0, 0, -1, 1, -1], np.int32)[:, None]  # writes nowhere, reads one token
# Up to this many int32 table entries a step copies whole table rows with the per-row arrays (one
# copy); past it (a very long max_model_len) only its own table width, in a second copy.
_ONE_COPY_TABLE_ENTRIES = 1 << 18


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 257, 8))
    sizes = [s for s in sizes if s < max_num_seqs] + [max_num_seqs]
    return sorted(set(s for s in sizes if s <= 512))


@dataclass
class _Stage:
    """A page-locked host copy of the input buffer (two alternate, so that a step can be written
    while the previous step's copy may still be queued) and the event that says its copy ran."""

    flat: torch.Tensor
    copied: torch.cuda.Event | None  # (None off CUDA)


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_num_seqs: int, max_model_len: int, block_size: int,
                 sample: bool):
        self.model = model
        self.device = device
        self.max_model_len = max_model_len
        self.sample = sample
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        self._stride = -(-n // 32) * 32  # each per-row array starts 128-byte aligned
        self._width = table_width(max_model_len, block_size)
        self._tables_at = _ROWS * self._stride
        size = self._tables_at + n * self._width
        cuda = device.type == "cuda"
        self._stages = [_Stage(torch.zeros(size, dtype=torch.int32, pin_memory=cuda),
                               torch.cuda.Event() if cuda else None) for _ in range(2)]
        for stage in self._stages:
            self._rows(stage.flat.numpy())[:] = _PADDED_ROW
        self.inputs = self._stages[0].flat.to(device, copy=True)
        self._turn = 0
        self._scratch = torch.empty(0, dtype=torch.int32, device=device)  # tables of long-context steps
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.prev_tokens = torch.zeros(n, dtype=torch.int64, device=device)  # the last sampled ids
        self.logits: torch.Tensor | None = None  # [n, vocab] (sample): the last graph step's logits
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, object] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _rows(self, flat):
        return flat[: self._tables_at].reshape(_ROWS, self._stride)

    def _tables(self, flat):
        return flat[self._tables_at :].reshape(-1, self._width)

    def _size(self, b: int) -> int:
        return next(s for s in self.sizes if s >= b)

    def _run(self, bs: int):
        """The captured work of one batch size: pending ids gathered, the model, and with `sample`
        the LM head and the greedy choice. Returns hidden [bs, H], or (ids [bs], logprobs [bs])."""
        ids, positions, slots, seq_lens, pending = self._rows(self.inputs)[:, :bs]
        ids = torch.where(pending >= 0, self.prev_tokens[pending.clamp(min=0)], ids.long())
        meta = AttentionMetadata(
            slot_mapping=slots.long(),
            block_tables=self._tables(self.inputs)[:bs],
            seq_lens=seq_lens,
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )
        hidden = self.model(ids, positions.long(), meta)
        if not self.sample:
            return hidden
        logits = self.model.compute_logits(hidden)
        if self.logits is None:  # (the first pass, outside any graph: the vocabulary size is known now)
            self.logits = torch.empty(self.max_batch, logits.shape[1], dtype=logits.dtype, device=self.device)
        self.logits[:bs].copy_(logits)
        chosen, logprobs = kernels.greedy_sample(logits)
        self.prev_tokens[:bs].copy_(chosen)
        return chosen, logprobs

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        with kernels.for_cuda_graph():  # kernels picked for GPU time: a graph's launches cost nothing on replay
            for bs in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                self._run(bs)  # warm-up (Triton compiles here)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                # thread_local: under tensor parallelism NCCL's watchdog thread polls its events while
                # this thread captures the all-reduces; only this thread's calls may break the capture.
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    self.outputs[bs] = self._run(bs)
                pool = g.pool()
                self.graphs[bs] = g
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch 1..%d%s) in %.1f s", len(self.sizes), self.max_batch,
                    "; LM head and greedy choice inside" if self.sample else "", time.perf_counter() - t0)

    def fits(self, step: StepInput) -> bool:
        """Whether step is a decode step a graph can run: one new token per sequence, every one sampled
        in order, at most max_batch of them, pending tokens from rows the graphs hold."""
        b = step.num_seqs
        return (step.max_query_len == 1 and b <= self.max_batch and step.logit_rows.shape[0] == b
                and (not step.pending_src.size or int(step.pending_src.max()) < self.max_batch))

    def load(self, step: StepInput) -> None:
        """Write one decode step's inputs into the graphs' input buffer: one host-to-device copy (two
        when max_model_len makes whole table rows large). Waits only for the copy of two steps ago."""
        stage = self._stages[self._turn]
        self._turn ^= 1
        if stage.copied is not None:
            stage.copied.synchronize()
        b, bs = step.num_seqs, self._size(step.num_seqs)
        host = stage.flat.numpy()
        rows = self._rows(host)
        rows[0, :b], rows[1, :b], rows[2, :b], rows[3, :b] = (
            step.input_ids, step.positions, step.slot_mapping, step.seq_lens)
        rows[4, :b] = -1
        rows[4, step.pending_dst] = step.pending_src
        rows[:, b:bs] = _PADDED_ROW
        w = step.block_tables.shape[1]
        if b * self._width <= _ONE_COPY_TABLE_ENTRIES:
            self._tables(host)[:b, :w] = step.block_tables
            end = self._tables_at + b * self._width
            self.inputs[:end].copy_(stage.flat[:end], non_blocking=True)
        else:
            packed = stage.flat[self._tables_at : self._tables_at + b * w]
            packed.numpy()[:] = step.block_tables.reshape(-1)
            self.inputs[: self._tables_at].copy_(stage.flat[: self._tables_at], non_blocking=True)
            if self._scratch.numel() < packed.numel():
                self._scratch = torch.empty(self.max_batch * self._width, dtype=torch.int32, device=self.device)
            scratch = self._scratch[: packed.numel()]
            scratch.copy_(packed, non_blocking=True)
            self._tables(self.inputs)[:b, :w].copy_(scratch.view(b, w))
        if stage.copied is not None:
            stage.copied.record()

    def replay(self, b: int):
        """Run the graph for the B sequences `load` put in: hidden states [B, hidden], or with `sample`
        (greedy ids [B], their logprobs [B]) with the logits in `self.logits[:B]`."""
        bs = self._size(b)
        if self.graphs:
            self.graphs[bs].replay()
            out = self.outputs[bs]
        else:  # not captured (off CUDA, where tests run the same work): run it eagerly
            out = self._run(bs)
        return out[:b] if not self.sample else (out[0][:b], out[1][:b])
