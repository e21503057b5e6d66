"""Turns a schedule into one flat varlen batch, runs the model, returns the logits to sample.

Prefill, chunked prefill and decode are the same thing here: some new tokens per sequence on top
of some cached context. The runner owns the KV cache tensors (one per layer, bound to the model's
attention layers once) and knows nothing about requests beyond their token ids and block tables.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from paged_backend import kernels
from paged_backend.engine.scheduler import SchedulerOutput
from paged_backend.layers.attention import AttentionMetadata
from paged_backend.runtime.cuda_graphs import DecodeGraphs
from paged_backend.runtime.transfer import int32_arrays_to_device, to_device


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None  # decode steps under CUDA graphs (CUDA only)

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        layers = self.model.attention_layers()
        if len(layers) != len(kv_caches):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(layers)} attention layers")
        for attn, cache in zip(layers, kv_caches):
            attn.kv_cache = cache
        self.kv_caches = kv_caches

    def _host_batch(self, sched: SchedulerOutput) -> tuple[list[np.ndarray], int, int]:
        """The step's inputs as int32 arrays: input ids, positions, slots, seq lens, query start
        locations, block tables, the rows whose logits are sampled, and where the device must put
        tokens sampled last step that the host has not read back yet (destination, source row);
        and the longest query and sequence lengths."""
        sc = sched.scheduled
        b, bs = len(sc), self.block_size
        n = np.fromiter((s.num_new_tokens for s in sc), np.int64, b)
        start = np.fromiter((s.seq.num_computed_tokens for s in sc), np.int64, b)
        rows = np.fromiter((s.seq.table_row for s in sc), np.int64, b)
        completes = np.fromiter((s.completes_prompt for s in sc), bool, b)
        seq_lens = start + n
        max_seq_len = int(seq_lens.max())
        qsl = np.zeros(b + 1, np.int64)
        np.cumsum(n, out=qsl[1:])
        owner = np.repeat(np.arange(b), n)  # the sequence of each new token
        positions = np.arange(qsl[-1]) - qsl[owner] + start[owner]
        # A width that is a multiple of 16: Triton compiles a kernel variant per divisibility of
        # the tables' row stride, and a width that changes with every step would keep hitting both.
        width = -(-max_seq_len // (bs * 16)) * 16
        tables = sched.block_tables[rows, :width]
        slots = tables[owner, positions // bs] * bs + positions % bs
        ids: list[int] = []
        pending_dst: list[int] = []
        pending_src: list[int] = []
        for s in sc:
            seq, first = s.seq, s.seq.num_computed_tokens
            if first < len(seq.token_ids):
                ids.extend(seq.token_ids[first : first + s.num_new_tokens])
            else:  # its one new token was sampled last step and is still only on the device
                pending_dst.append(len(ids))
                pending_src.append(seq.pending_row)
                ids.append(0)
        arrays = [np.array(ids), positions, slots, seq_lens, qsl, tables, (qsl[1:] - 1)[completes],
                  np.array(pending_dst), np.array(pending_src)]
        return arrays, int(n.max()), max_seq_len

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        self.graphs = DecodeGraphs(self.model, self.device, max_num_seqs, max_model_len, self.block_size)
        self.graphs.capture()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [num rows that complete their known tokens, vocab] in fp32, in schedule order.

        prev_tokens: the previous step's sampled ids on the device, for sequences whose newest
        token the host has not read back yet. Nothing here waits for the GPU.
        """
        if sched.block_copies:
            src, dst = zip(*sched.block_copies)
            kernels.copy_blocks(
                self.kv_caches, to_device(src, torch.int64, self.device), to_device(dst, torch.int64, self.device)
            )
        host, max_query_len, max_seq_len = self._host_batch(sched)
        ids, positions, slots, seq_lens, qsl, tables, logit_rows, pending_dst, pending_src = (
            int32_arrays_to_device(host, self.device)
        )
        ids, positions, slots = ids.long(), positions.long(), slots.long()
        if pending_dst.numel():
            ids[pending_dst.long()] = prev_tokens[pending_src.long()]
        if self.graphs is not None and max_query_len == 1 and seq_lens.shape[0] <= self.graphs.max_batch:
            hidden = self.graphs.run(ids, positions, slots, tables, seq_lens)
        else:
            meta = AttentionMetadata(
                slot_mapping=slots,
                block_tables=tables,
                seq_lens=seq_lens,
                query_start_loc=qsl,
                max_query_len=max_query_len,
                max_seq_len=max_seq_len,
            )
            hidden = self.model(ids, positions, meta)
        if not logit_rows.numel():
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden.index_select(0, logit_rows)).float()

    @torch.inference_mode()
    def profile(self, num_tokens: int, spec) -> None:
        """One forward pass over num_tokens prompt tokens (peak activation memory), on a throwaway
        cache just large enough for them."""
        num_blocks = -(-num_tokens // self.block_size)
        self.bind_kv_caches(spec.allocate(num_blocks, self.device))
        slots = torch.arange(num_tokens, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=torch.arange(num_blocks, device=self.device, dtype=torch.int32)[None],
            seq_lens=torch.tensor([num_tokens], device=self.device, dtype=torch.int32),
            query_start_loc=torch.tensor([0, num_tokens], device=self.device, dtype=torch.int32),
            max_query_len=num_tokens,
            max_seq_len=num_tokens,
        )
        ids = torch.randint(0, 100, (num_tokens,), device=self.device)
        hidden = self.model(ids, slots, meta)
        self.model.compute_logits(hidden[-1:])
        self.release()

    def release(self) -> None:
        """Drop the KV cache and graphs (shutdown or after profiling)."""
        self.graphs = None
        for attn in self.model.attention_layers():
            attn.kv_cache = None
        self.kv_caches = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
