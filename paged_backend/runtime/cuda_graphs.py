"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured at start-up.

A decode-only step (every sequence adds one token) launches the same kernels every time; only
the contents of a few small tensors change. Each graph reads its inputs from static buffers that
the runner fills before `replay()`. Attention in a graph is launched for the longest possible
context (max_model_len), and the kernel reads each sequence's real length from `seq_lens`, so one
graph serves every context length. Padded rows write nowhere (slot -1) and are never read back.
"""

from __future__ import annotations

import logging
import time

import torch

from paged_backend import kernels
from paged_backend.layers.attention import AttentionMetadata
from paged_backend.runtime.step_input import table_width

logger = logging.getLogger("paged_backend")


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 257, 8))
    sizes = [s for s in sizes if s < max_num_seqs] + [max_num_seqs]
    return sorted(set(s for s in sizes if s <= 512))


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_num_seqs: int, max_model_len: int, block_size: int):
        self.model = model
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        max_blocks = table_width(max_model_len, block_size)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks, **i32)
        self.seq_lens = torch.ones(n, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        with kernels.for_cuda_graph():  # kernels picked for GPU time: a graph's launches cost nothing on replay
            for bs in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                meta = self._meta(bs)
                self.model(self.input_ids[:bs], self.positions[:bs], meta)  # warm-up (Triton compiles here)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                # thread_local: under tensor parallelism NCCL's watchdog thread polls its events while
                # this thread captures the all-reduces; only this thread's calls may break the capture.
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs], meta)
                pool = g.pool()
                self.graphs[bs] = g
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.sizes), self.max_batch,
                    time.perf_counter() - t0)

    def _size(self, b: int) -> int:
        return next(s for s in self.sizes if s >= b)

    def load(self, input_ids, positions, slots, block_tables, seq_lens) -> torch.Tensor:
        """Copy one decode step's device inputs (B sequences; int32 or int64) into the graphs' static
        buffers. Returns the static input-id buffer's B rows (the caller may still fill in ids)."""
        b = input_ids.shape[0]
        bs = self._size(b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(slots)
        self.block_tables[:b, : block_tables.shape[1]].copy_(block_tables)
        self.seq_lens[:b].copy_(seq_lens)
        if bs > b:  # padded rows write nowhere and read one token
            self.slot_mapping[b:bs].fill_(-1)
            self.seq_lens[b:bs].fill_(1)
        return self.input_ids[:b]

    def replay(self, b: int) -> torch.Tensor:
        """Run the graph for the B sequences `load` put in -> hidden states [B, hidden]."""
        bs = self._size(b)
        self.graphs[bs].replay()
        return self.outputs[bs][:b]
