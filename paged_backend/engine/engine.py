"""The engine: add requests, step, abort. One step = schedule, run the model, sample, post-process.

Read top to bottom: `Engine.__init__` builds everything from EngineArgs (model, tokenizer, KV
cache, scheduler); `add_request` validates and queues; `step` runs one batch and returns the
outputs of the requests it touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence as Seq, Union

import torch

from paged_backend.args import EngineArgs
from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.detokenizer import Detokenizer
from paged_backend.engine.scheduler import Scheduler, SchedulerOutput
from paged_backend.engine.sequence import Request, Sequence
from paged_backend.engine.setup import EngineSetup, build_engine_parts
from paged_backend.layers.sampler import SampledTokens, Sampler, SamplingRow
from paged_backend.outputs import CompletionOutput, RequestOutput
from paged_backend.params import SamplingParams
from paged_backend.runtime.transfer import to_device

logger = logging.getLogger("paged_backend")

PromptInput = Union[str, list[int]]


@dataclass
class _Batch:
    """A launched batch: the sequences of its sampled rows, in row order, and their samples."""

    row_seqs: list[Sequence]
    sampled: SampledTokens
    overlappable: bool  # no row's sampling reads the token history: the next batch may go first


@dataclass
class EngineStats:
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int
    num_blocks_cached: int
    num_running: int
    num_waiting: int
    kv_slots_allocated: int  # slots in blocks that are in use
    kv_slots_holding_tokens: int  # of which hold a computed token (allocated - holding = waste)
    prefix_cache_hit_rate: float
    prefix_cache_hit_tokens: int
    num_preemptions: int
    num_steps: int
    max_seqs_in_step: int  # the largest batch one forward pass has carried
    total_prompt_tokens: int
    total_generated_tokens: int
    quantization: Optional[str] = None  # "fp8": float8_e4m3fn linear weights
    kv_cache_dtype: str = ""  # e.g. "bfloat16", "float8_e4m3fn"
    weight_bytes: int = 0  # model parameters as stored
    kv_bytes_per_token: int = 0  # K and V of one token, all layers


class Engine:
    def __init__(self, args: EngineArgs):
        parts: EngineSetup = build_engine_parts(args)
        self.args = args
        self.device = parts.device
        self.dtype = parts.dtype
        self.hf_config = parts.hf_config
        self.tokenizer = parts.tokenizer
        self.max_model_len = parts.max_model_len
        self.vocab_size = parts.vocab_size
        self.eos_token_ids = parts.eos_token_ids
        self.runner = parts.runner
        self._memory_stats = dict(
            quantization=parts.quantization,
            kv_cache_dtype=parts.kv_cache_dtype,
            weight_bytes=parts.weight_bytes,
            kv_bytes_per_token=parts.kv_bytes_per_token,
        )
        self.block_manager = BlockManager(parts.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, parts.max_num_batched_tokens)
        self.sampler = Sampler()
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._next_id = 0
        self.num_steps = 0
        self.max_seqs_in_step = 0
        self.total_prompt_tokens = 0
        self.total_generated_tokens = 0
        self._in_flight: Optional[_Batch] = None  # launched, its tokens not read back yet

    # ---- requests ---------------------------------------------------------------------------
    def tokenize(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or token id")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not ids:
                raise ValueError("prompt is empty: give at least one character or token id")
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size}); got {bad[:5]}")
            return None, ids
        raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    def add_request(
        self,
        prompt: PromptInput,
        params: Optional[SamplingParams] = None,
        request_id: Optional[str] = None,
    ) -> Request:
        params = coerce_params(params)
        text, ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}; the prompt "
                f"must leave room for at least one generated token: shorten it or raise max_model_len"
            )
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} is larger than max_num_seqs={self.scheduler.max_num_seqs}")
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        elif request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        req = Request(request_id, text, ids, params)
        seq = Sequence(req, 0, list(ids), generator=self._generator(params, 0), pending_forks=params.n - 1)
        self.detokenizer.start(seq)
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        self.total_prompt_tokens += len(ids)
        return req

    def _generator(self, params: SamplingParams, index: int) -> Optional[torch.Generator]:
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed + index)

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request wherever it is and free its blocks. Returns its final output."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        req.seqs[0].pending_forks = 0
        req.metrics.finished_time = time.time()
        return self._make_output(req, finished=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------
    def step(self, emit_unfinished: bool = True) -> list[RequestOutput]:
        """Launch one batch, then post-process the previous one while the GPU runs this one.

        Returns the outputs of the requests the previous batch advanced (only the finished ones
        when emit_unfinished is False: the offline API needs nothing else). A sequence sampled in
        batch N takes part in batch N+1 before the host has read its token: the token goes from
        the sampler's output straight into N+1's inputs on the device. If its token ends it, the
        extra position computed for it is dropped. Batches whose sampling reads the token history
        (penalties, min_tokens) are post-processed before the next one is scheduled.
        """
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and not self._in_flight.overlappable:
            outputs += self._finish_batch(self._in_flight, emit_unfinished)
            self._in_flight = None
        sched = self.scheduler.schedule()
        launched = self._launch(sched) if sched.scheduled else None
        if self._in_flight is not None:
            outputs += self._finish_batch(self._in_flight, emit_unfinished)
        elif launched is None and self.scheduler.has_work():
            raise RuntimeError("scheduler could not run anything although requests are waiting")
        self._in_flight = launched
        return outputs

    def _launch(self, sched: SchedulerOutput) -> _Batch:
        self.num_steps += 1
        self.max_seqs_in_step = max(self.max_seqs_in_step, len(sched.scheduled))
        prev = self._in_flight.sampled.token_ids if self._in_flight is not None else None
        logits = self.runner.execute(sched, prev)

        rows: list[SamplingRow] = []
        row_seqs: list[Sequence] = []
        logit_index: list[int] = []
        num_logit_rows = 0
        for s in sched.scheduled:
            seq = s.seq
            completes = s.completes_prompt
            seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if not completes:
                continue
            for member in self._fork(seq):  # forked siblings sample from the same logits row
                rows.append(self._sampling_row(member))
                row_seqs.append(member)
                logit_index.append(num_logit_rows)
            num_logit_rows += 1
        if len(logit_index) != num_logit_rows:
            logits = logits.index_select(0, to_device(logit_index, torch.int64, logits.device))
        sampled = self.sampler.sample(logits, rows)
        for k, seq in enumerate(row_seqs):
            seq.num_pending_tokens += 1
            seq.pending_row = k
            seq.pending_is_last = self._at_length_limit(seq, seq.num_total_tokens)
        overlappable = not any(_reads_history(r.params) for r in rows)
        return _Batch(row_seqs, sampled, overlappable)

    def _finish_batch(self, batch: _Batch, emit_unfinished: bool) -> list[RequestOutput]:
        """Read a launched batch's tokens back and post-process them (stops, text, outputs)."""
        out = batch.sampled.resolve()
        now = time.time()
        touched: dict[str, Request] = {}
        for k, seq in enumerate(batch.row_seqs):
            seq.num_pending_tokens -= 1
            if seq.finished:  # stopped by an earlier token, or aborted: this one is dropped
                continue
            self._append_token(seq, out.token_ids[k], out.logprobs[k], out.top_logprobs[k], now)
            self.block_manager.cache_full_blocks(seq)
            touched[seq.request.request_id] = seq.request
        outputs = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = time.time()
                self.requests.pop(req.request_id, None)
                outputs.append(self._make_output(req, finished=True))
            elif emit_unfinished:
                outputs.append(self._make_output(req, finished=False))
        return outputs

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """seq plus, the first time its prompt completes, its n-1 siblings sharing its blocks."""
        if not seq.pending_forks:
            return [seq]
        req = seq.request
        members = [seq]
        for index in range(1, seq.pending_forks + 1):
            child = Sequence(req, index, list(seq.token_ids), generator=self._generator(req.params, index))
            self.detokenizer.start(child)
            self.block_manager.fork(seq, child)
            self.scheduler.add_running(child)
            req.seqs.append(child)
            members.append(child)
        seq.pending_forks = 0
        return members

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        history = _reads_history(seq.params)
        if seq.sampling_row is not None and not history:
            return seq.sampling_row  # nothing in it changes from step to step
        row = SamplingRow(
            params=seq.params,
            prompt_token_ids=seq.request.prompt_token_ids,
            output_token_ids=seq.output_token_ids if history else [],
            generator=seq.generator,
            eos_token_ids=self.eos_token_ids,
        )
        if not history:
            seq.sampling_row = row
        return row

    def _at_length_limit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq, once it holds num_tokens tokens, ends by length (max_tokens or max_model_len)."""
        max_tokens = seq.params.max_tokens
        return num_tokens >= self.max_model_len or (
            max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens
        )

    def _append_token(self, seq: Sequence, token: int, logprob: float, top: Optional[dict], now: float) -> None:
        params = seq.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if params.logprobs is not None and top is not None:
            seq.logprobs.append(top)
        self.total_generated_tokens += 1
        m = seq.request.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        elif m.last_token_time is not None and seq.index == 0:
            m.inter_token_latencies.append(now - m.last_token_time)
        m.last_token_time = now

        num_out = seq.num_output_tokens
        stop_token = None
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                stop_token = ("eos", None)
            elif params.stop_token_ids and token in params.stop_token_ids:
                stop_token = ("id", token)
        if stop_token is None or params.include_stop_str_in_output:
            stop_str = self.detokenizer.update(seq)
            if stop_str is not None:
                return self._finish_seq(seq, "stop", stop_str)
        if stop_token is not None:
            return self._finish_seq(seq, "stop", stop_token[1])
        if self._at_length_limit(seq, seq.num_tokens):
            return self._finish_seq(seq, "length", None)

    def _finish_seq(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _make_output(self, req: Request, finished: bool) -> RequestOutput:
        # model_construct: the engine's own, already valid data; validation would cost more than
        # the rest of the step at hundreds of requests.
        outputs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            delta_text, delta_ids = self.detokenizer.take_delta(seq)
            out_ids = seq.output_token_ids
            outputs.append(
                CompletionOutput.model_construct(
                    index=seq.index,
                    text=seq.text,
                    token_ids=out_ids,
                    cumulative_logprob=seq.cumulative_logprob if out_ids else None,
                    logprobs=list(seq.logprobs) if req.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    text_delta=delta_text,
                    token_ids_delta=delta_ids,
                )
            )
        return RequestOutput.model_construct(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            metrics=req.metrics.model_copy(),
            num_cached_tokens=req.num_cached_tokens,
        )

    # ---- introspection ----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        bs = bm.block_size
        filled: dict[int, int] = {}
        for seq in self.scheduler.running:
            for i, b in enumerate(seq.block_table):
                n = min(bs, max(0, seq.num_computed_tokens - i * bs))
                filled[b] = max(filled.get(b, 0), n)
        return EngineStats(
            num_blocks_total=bm.num_blocks,
            num_blocks_used=bm.num_used_blocks,
            num_blocks_free=bm.num_free_blocks,
            num_blocks_cached=bm.num_cached_blocks,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_slots_allocated=bm.num_used_blocks * bs,
            kv_slots_holding_tokens=sum(filled.values()),
            prefix_cache_hit_rate=bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
            prefix_cache_hit_tokens=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            max_seqs_in_step=self.max_seqs_in_step,
            total_prompt_tokens=self.total_prompt_tokens,
            total_generated_tokens=self.total_generated_tokens,
            **self._memory_stats,
        )

    def all_sequences(self) -> list[Sequence]:
        return [s for r in self.requests.values() for s in r.seqs if not s.finished]

    def shutdown(self) -> None:
        for rid in list(self.requests):
            self.abort_request(rid)
        self._in_flight = None
        self.runner.release()


def _reads_history(p: SamplingParams) -> bool:
    """Only penalties and min_tokens read the generated tokens when sampling."""
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty or p.min_tokens)


def coerce_params(params) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams(**params)
    raise TypeError(f"sampling_params must be SamplingParams or a dict, got {type(params).__name__}")
