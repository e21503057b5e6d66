"""Turns a schedule into one flat varlen batch, runs the model, returns the logits to sample.

Prefill, chunked prefill and decode are the same thing here: some new tokens per sequence on top
of some cached context. The runner owns the KV cache tensors (one per layer, bound to the model's
attention layers once) and knows nothing about requests beyond their token ids and block tables.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_backend import kernels
from paged_backend.engine.scheduler import SchedulerOutput
from paged_backend.layers.attention import AttentionMetadata
from paged_backend.runtime.cuda_graphs import DecodeGraphs


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.kv_caches: list[torch.Tensor] = []
        self._pin = device.type == "cuda"
        self.graphs: DecodeGraphs | None = None  # decode steps under CUDA graphs (CUDA only)

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        layers = self.model.attention_layers()
        if len(layers) != len(kv_caches):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(layers)} attention layers")
        for attn, cache in zip(layers, kv_caches):
            attn.kv_cache = cache
        self.kv_caches = kv_caches

    def _to_device(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self._pin)
        return t.to(self.device, non_blocking=True)

    def _host_batch(self, sched: SchedulerOutput):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        qsl = [0]
        logit_rows: list[int] = []
        tables = []
        for s in sched.scheduled:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            seq_lens.append(start + n)
            qsl.append(qsl[-1] + n)
            tables.append(table)
            if s.completes_prompt:
                logit_rows.append(qsl[-1] - 1)
        return input_ids, positions, slots, seq_lens, qsl, tables, logit_rows

    def build_batch(self, sched: SchedulerOutput):
        """Flat input ids, positions and attention metadata; and which rows produce logits."""
        input_ids, positions, slots, seq_lens, qsl, tables, logit_rows = self._host_batch(sched)
        width = max(len(t) for t in tables)
        block_tables = [t + [0] * (width - len(t)) for t in tables]
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._to_device(block_tables, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            query_start_loc=self._to_device(qsl, torch.int32),
            max_query_len=max(s.num_new_tokens for s in sched.scheduled),
            max_seq_len=max(seq_lens),
        )
        ids = self._to_device(input_ids, torch.int64)
        pos_t = self._to_device(positions, torch.int64)
        return ids, pos_t, meta, logit_rows

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        self.graphs = DecodeGraphs(self.model, self.device, max_num_seqs, max_model_len, self.block_size)
        self.graphs.capture()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Logits [num rows that complete their known tokens, vocab] in fp32, in schedule order."""
        if sched.block_copies:
            src, dst = zip(*sched.block_copies)
            kernels.copy_blocks(
                self.kv_caches, self._to_device(src, torch.int64), self._to_device(dst, torch.int64)
            )
        if self.graphs is not None and len(sched.scheduled) <= self.graphs.max_batch and all(
            s.num_new_tokens == 1 for s in sched.scheduled
        ):
            input_ids, positions, slots, seq_lens, _, tables, logit_rows = self._host_batch(sched)
            hidden = self.graphs.run(input_ids, positions, slots, tables, seq_lens)
        else:
            ids, positions, meta, logit_rows = self.build_batch(sched)
            hidden = self.model(ids, positions, meta)
        if not logit_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        rows = self._to_device(logit_rows, torch.int64)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()

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
