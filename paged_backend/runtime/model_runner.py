"""Runs one step input: copies it to the device, runs the model, samples the next tokens.

Prefill, chunked prefill and decode are the same thing here: some new tokens per sequence on top
of some cached context. The runner owns the KV cache tensors (one per layer, bound to the model's
attention layers once), the CUDA graphs and the sampler; it knows nothing about requests beyond
the plain arrays of a `StepInput`.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from paged_backend import kernels
from paged_backend.layers.attention import AttentionMetadata
from paged_backend.layers.parallel import SINGLE, TPGroup
from paged_backend.runtime.cuda_graphs import DecodeGraphs
from paged_backend.runtime import step_profile
from paged_backend.runtime.sampler import SampledTokens, Sampler
from paged_backend.runtime.step_input import StepInput
from paged_backend.runtime.transfer import int32_arrays_to_device, to_device

logger = logging.getLogger("paged_backend")


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int, tp: TPGroup = SINGLE):
        self.model = model
        self.tp = tp  # under tensor parallelism: this rank's shard; only rank 0 samples
        self.device = device
        self.block_size = block_size
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None  # decode steps under CUDA graphs (CUDA only)
        self.sampler = Sampler()
        self._last_sampled: torch.Tensor | None = None  # the previous step's ids, on the device
        self._prev_in_graph = False  # they are the graphs' own greedy choice, already in graphs.prev_tokens
        label = f"rank {tp.rank}/{tp.size}" if tp.size > 1 else "tp=1"
        self.step_profile = step_profile.from_env(label, device)  # None unless PAGED_BACKEND_PROFILE_STEPS=1

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        layers = self.model.attention_layers()
        if len(layers) != len(kv_caches):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(layers)} attention layers")
        for attn, cache in zip(layers, kv_caches):
            attn.kv_cache = cache
        self.kv_caches = kv_caches

    @torch.inference_mode()
    def warm_up(self, max_tokens: int) -> None:
        """Run prompt steps of 2, 4, ..., 128 tokens (up to max_tokens) once, then a decode and a prompt in
        one step, on the bound cache, storing nothing: the attention kernel's launch configuration follows
        a step's longest query, a mixed step runs its decodes in a launch of their own, and Triton compiles
        each configuration on first use (seconds on a fresh machine), which would otherwise stall every
        request of the first serving step that needs it. Every rank runs the same steps."""
        t0 = time.perf_counter()
        lens = [n for n in (2, 4, 8, 16, 32, 64, 128) if n <= max_tokens]
        for n in lens:
            self._dry_step([n], [n], store=False)
        if max_tokens > 2:
            self._dry_step([1, 2], [2, 2], store=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("warmed up prompt steps of %s tokens in %.1f s", "/".join(map(str, lens)), time.perf_counter() - t0)

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        self.graphs = DecodeGraphs(self.model, self.device, max_num_seqs, max_model_len, self.block_size,
                                   sample=self.tp.size == 1)
        self.graphs.capture()

    def execute(self, step: StepInput, grammar_mask=None) -> SampledTokens | None:
        """Run one step and sample it: the sampled ids stay on the device (the next step reads its
        pending tokens from them) and come to the host when the caller resolves them. None when no
        sequence completes its known tokens this step (only prompt chunks ran). Nothing here waits
        for the GPU.
        """
        if self.step_profile is None:
            return self._execute(step, grammar_mask)
        self.step_profile.begin(step)
        return self.step_profile.end(self._execute(step, grammar_mask))

    @torch.inference_mode()
    def _execute(self, step: StepInput, grammar_mask=None) -> SampledTokens | None:
        self.sampler.release(step.released_seeds)
        if step.block_copies:
            src, dst = zip(*step.block_copies)
            kernels.copy_blocks(
                self.kv_caches, to_device(src, torch.int64, self.device), to_device(dst, torch.int64, self.device)
            )
        if self.graphs is not None and self.graphs.fits(step):
            return self._execute_graphed(step, grammar_mask)
        prof = self.step_profile
        ids, positions, slots, seq_lens, qsl, tables, logit_rows, pending_dst, pending_src = (
            int32_arrays_to_device(step.int32_arrays(), self.device)
        )
        ids, positions, slots = ids.long(), positions.long(), slots.long()
        if pending_dst.numel():
            ids[pending_dst] = self._previous_tokens(step)[pending_src]
        if prof is not None:
            prof.mark("inputs")
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables,
            seq_lens=seq_lens,
            query_start_loc=qsl,
            max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len,
            plan=kernels.plan_step(slots, tables, seq_lens, qsl, self.block_size),
            num_decodes=step.num_decodes,
        )
        hidden = self.model(ids, positions, meta)
        if prof is not None:
            prof.mark("forward")
        if not step.logit_rows.size:  # rank 0 then has no sampling rows; the workers never get any
            self._set_last_sampled(None)
            return None
        return self._sample(self.model.compute_logits(hidden.index_select(0, logit_rows)), step, grammar_mask)

    def _execute_graphed(self, step: StepInput, grammar_mask) -> SampledTokens | None:
        """A decode step from the CUDA graphs: the inputs in one copy, pending ids gathered inside the
        graph (copied in first unless the previous step's graph left them there), and on one GPU the
        LM head and greedy choice inside the graph too."""
        prof, graphs = self.step_profile, self.graphs
        graphs.load(step)
        if step.pending_src.size and not self._prev_in_graph:
            prev = self._previous_tokens(step)[: graphs.max_batch]
            graphs.prev_tokens[: prev.shape[0]].copy_(prev)
        if prof is not None:
            prof.mark("inputs")
        out = graphs.replay(step.num_seqs)
        if prof is not None:
            prof.mark("forward")
        if not graphs.sample:  # tensor parallelism: the LM head gathers every rank's vocab range
            return self._sample(self.model.compute_logits(out), step, grammar_mask)
        sampled = self._sample(graphs.logits[: step.num_seqs], step, grammar_mask, greedy=out)
        self._prev_in_graph = sampled.token_ids is out[0]  # the graph's own choice: prev_tokens holds it
        return sampled

    def _sample(self, logits: torch.Tensor | None, step: StepInput, grammar_mask, greedy=None) -> SampledTokens | None:
        """Sample the step's rows from its logits (None on a tensor-parallel worker: rank 0 samples).
        greedy: the greedy ids and logprobs of these logits, if already chosen (a graph's)."""
        prof = self.step_profile
        if prof is not None:
            prof.mark("logits")
        if logits is None:
            return None
        if step.sample_from is not None:  # forked siblings sample from their parent's row
            logits = logits.index_select(0, to_device(step.sample_from, torch.int64, self.device))
            greedy = None
        # grammar_mask(bitmask) fills the structured-output masks; the sampler calls it once this
        # step's kernels are queued, so that the host fills them while the device runs them.
        sampled = self.sampler.sample(logits, step.sampling_rows, grammar_mask=grammar_mask, greedy=greedy)
        if prof is not None:
            prof.mark("sample")
        self._set_last_sampled(sampled.token_ids)
        return sampled

    def _set_last_sampled(self, token_ids: torch.Tensor | None) -> None:
        self._last_sampled = token_ids
        self._prev_in_graph = False

    def _previous_tokens(self, step: StepInput) -> torch.Tensor:
        """The previous step's sampled ids on the device. Rank 0 sampled them; under tensor
        parallelism it broadcasts the rows this step reads (on the device: no host wait)."""
        if self.tp.size == 1:
            return self._last_sampled
        n = int(step.pending_src.max()) + 1
        if self.tp.rank == 0:
            rows = self._last_sampled[:n].to(torch.int64)
        else:
            rows = torch.empty(n, dtype=torch.int64, device=self.device)
        return self.tp.broadcast(rows)

    @torch.inference_mode()
    def profile(self, num_tokens: int, spec) -> None:
        """One forward pass over num_tokens prompt tokens (peak activation memory), on a throwaway
        cache just large enough for them."""
        self.bind_kv_caches(spec.allocate(-(-num_tokens // self.block_size), self.device))
        hidden = self._dry_step([num_tokens], [num_tokens], store=True)
        self.model.compute_logits(hidden[-1:])
        self.release()

    def _dry_step(self, q_lens: list[int], ctx: list[int], store: bool) -> torch.Tensor:
        """One forward pass over sequences with q_lens new tokens (the last at position ctx - 1) and token
        id 0 everywhere, each reading cache blocks 0, 1, ...: their K/V stored there (store, one sequence)
        or read only (slots -1)."""
        dev, i32 = self.device, dict(dtype=torch.int32, device=self.device)
        positions = torch.cat([torch.arange(c - q, c, device=dev) for q, c in zip(q_lens, ctx)])
        table = torch.arange(-(-max(ctx) // self.block_size), **i32)
        meta = AttentionMetadata(
            slot_mapping=positions if store else torch.full_like(positions, -1),
            block_tables=table.repeat(len(ctx), 1),
            seq_lens=torch.tensor(ctx, **i32),
            query_start_loc=torch.tensor([0, *q_lens], **i32).cumsum(0, dtype=torch.int32),
            max_query_len=max(q_lens),
            max_seq_len=max(ctx),
            num_decodes=next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens)),
        )
        return self.model(torch.zeros(positions.shape[0], dtype=torch.int64, device=dev), positions, meta)

    def release(self) -> None:
        """Drop the KV cache, graphs and sampler state (shutdown or after profiling)."""
        if self.step_profile is not None:
            self.step_profile.report()
        self.graphs = None
        self._set_last_sampled(None)
        self.sampler = Sampler()
        for attn in self.model.attention_layers():
            attn.kv_cache = None
        self.kv_caches = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
