"""The engine: add requests, step, abort. One step = schedule, run the model, sample, post-process.

Read top to bottom: `Engine.__init__` builds everything from EngineArgs (model, tokenizer, KV
cache, scheduler); `add_request` validates and queues; `step` runs one batch and returns the
outputs of the requests it touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar, Union

from paged_backend.args import EngineArgs
from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.detokenizer import Detokenizer
from paged_backend.engine.scheduler import Scheduler, SchedulerOutput
from paged_backend.engine.sequence import PendingToken, Request, Sequence, SequenceStatus
from paged_backend.runtime.setup import EngineSetup, build_engine_parts
from paged_backend.engine.stats import EngineStats
from paged_backend.engine.step_builder import build_step_input, with_sampling
from paged_backend.errors import EngineDeadError
from paged_backend.outputs import CompletionOutput, RequestOutput, trusted
from paged_backend.params import SamplingParams, coerce_params
from paged_backend.runtime.sampling_row import SamplingRow
from paged_backend.structured.requests import StructuredRequests

logger = logging.getLogger("paged_backend")

PromptInput = Union[str, list[int]]
_T = TypeVar("_T")
_FINISHED = SequenceStatus.FINISHED
_SEED_MOD = 2**63  # SamplingParams bounds seed below this; siblings' seeds wrap instead of overflowing


class StepFailed(RuntimeError):
    """A step failed for some requests: they were aborted (blocks freed); the engine goes on.

    `request_ids` are exactly those requests; `outputs` what the step produced for the others."""

    def __init__(self, request_ids: list[str], cause: BaseException, outputs: list[RequestOutput]):
        super().__init__(f"the engine step failed for request(s) {request_ids}: {cause!r}")
        self.request_ids = request_ids
        self.cause = cause
        self.outputs = outputs


@dataclass
class _LaunchedStep:
    """A launched step: the sequences of its sampled rows, in row order, and their samples (None
    when no sequence completed its known tokens: only prompt chunks ran)."""

    step: int
    row_seqs: list[Sequence]
    sampled: object  # the runner's SampledTokens: `.resolve()` waits for the host copy
    overlappable: bool  # no row's sampling reads the token history: the next step may go first

    def request_ids(self) -> list[str]:
        return list(dict.fromkeys(seq.request.request_id for seq in self.row_seqs))


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
        self.detokenizer = Detokenizer(self.tokenizer)
        self.structured = StructuredRequests(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._next_id = 0
        self.num_steps = 0
        self.max_seqs_in_step = 0
        self.total_prompt_tokens = 0
        self.total_generated_tokens = 0
        self.num_preemptions = 0
        self._in_flight: Optional[_LaunchedStep] = None  # launched, its tokens not read back yet
        # Whether a step stays in flight while the next one launches. On the CPU the forward pass has
        # finished when execute returns: there is nothing to overlap, and keeping the step in flight
        # would only hold its tokens back by one more forward pass (the first token included) and
        # spend a pass on sequences that already stopped. Tests set it to run the pipelined path on CPU.
        self.overlap_steps = self.device.type != "cpu"
        self._released_seeds: list[int] = []  # seeded sequences that ended since the last launch
        self._failures: list[tuple[list[str], BaseException]] = []  # of the current step

    # ---- requests ---------------------------------------------------------------------------
    def tokenize(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or token id")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"prompt is not valid Unicode text: {e.reason} at character {e.start} "
                    f"({prompt[e.start:e.end]!r}); send UTF-8 text (no lone surrogates)"
                ) from None
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not ids:
                raise ValueError("prompt is empty: give at least one character or token id")
            if set(map(type, ids)) == {int} and 0 <= min(ids) and max(ids) < self.vocab_size:
                return None, ids  # (the common case, checked in C: the loop below costs ~0.3 us a token)
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
        *,
        prompt_text: Optional[str] = None,
    ) -> Request:
        """Validate and queue one request. prompt_text: the text to report as the prompt when
        token ids are given (e.g. a rendered chat template)."""
        params = coerce_params(params)
        text, ids = self.tokenize(prompt)
        if prompt_text is not None:
            text = prompt_text
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}; the prompt "
                f"must leave room for at least one generated token: shorten it or raise max_model_len"
            )
        params.check_token_ids(self.vocab_size)
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} is larger than max_num_seqs={self.scheduler.max_num_seqs}")
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        elif request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        grammar = self.structured.submit(params.structured_outputs)  # ValueError if it does not convert
        limit = self.max_model_len if params.max_tokens is None else min(self.max_model_len, len(ids) + params.max_tokens)
        req = Request(request_id, text, ids, params, grammar=grammar, token_limit=limit,
                      reads_history=_reads_history(params))
        seq = Sequence(req, 0, list(ids), seed=_sibling_seed(params, 0), pending_forks=params.n - 1)
        self.detokenizer.start(seq)
        req.seqs.append(seq)
        self.requests[request_id] = req
        if not self.structured.hold(seq):  # held back while its grammar compiles
            self.scheduler.add(seq)
        self.total_prompt_tokens += len(ids)
        return req

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request wherever it is and free its blocks. Returns its final output."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self._finish_seq(seq, "abort", None)
        req.seqs[0].pending_forks = 0
        req.metrics.finished_time = time.time()
        return self._make_output(req, finished=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------
    def step(self, emit_unfinished: bool = True) -> list[RequestOutput]:
        """Launch one step, then post-process the previous one while the GPU runs this one (on the
        CPU, where the launch returns only when the forward pass is done, this one right away).

        Returns the outputs of the requests the previous step advanced (only the finished ones
        when emit_unfinished is False: the offline API needs nothing else). A sequence sampled in
        step N takes part in step N+1 before the host has read its token: the token goes from
        the sampler's output straight into N+1's inputs on the device. If its token ends it, the
        extra position computed for it is dropped. Steps whose sampling reads the token history
        (penalties, min_tokens) are post-processed before the next one is scheduled. When this
        step has grammar masks to fill, the previous one is post-processed while they fill.

        When launching or post-processing a step raises, exactly the requests of that step are
        aborted and StepFailed names them (after the rest of this step has run).
        """
        outputs: list[RequestOutput] = self._admit_compiled()
        self._failures = []
        if self._in_flight is not None and not self._in_flight.overlappable:
            done, self._in_flight = self._in_flight, None
            outputs += self._guarded(done.request_ids, [], self._finish, done, emit_unfinished)
        sched = self.scheduler.schedule()
        self.num_preemptions += sched.num_preempted
        in_flight = [self._in_flight] if self._in_flight is not None else []

        def finish_in_flight() -> None:  # once: inside the launch while its grammar masks fill, else after it
            while in_flight:
                done = in_flight.pop()
                outputs.extend(self._guarded(done.request_ids, [], self._finish, done, emit_unfinished))

        launched = None
        if sched.seqs:
            ids = lambda: list(dict.fromkeys(s.request.request_id for s in sched.seqs))  # noqa: E731
            launched = self._guarded(ids, None, self._launch, sched, finish_in_flight if in_flight else None)
        if self._in_flight is not None:
            finish_in_flight()
        elif launched is None and not sched.seqs and self.scheduler.has_work():
            raise RuntimeError("scheduler could not run anything although requests are waiting")
        if launched is not None and not self.overlap_steps:
            outputs += self._guarded(launched.request_ids, [], self._finish, launched, emit_unfinished)
            launched = None
        self._in_flight = launched
        if self._failures:
            failed = [rid for ids, _ in self._failures for rid in ids]
            raise StepFailed(list(dict.fromkeys(failed)), self._failures[0][1], outputs)
        return outputs

    def _guarded(self, request_ids: Callable[[], list[str]], default: _T, fn: Callable[..., _T], *args) -> _T:
        """fn(*args); if it raises, abort the requests request_ids() names (freeing their blocks) and note
        the failure. (A callable: the ids are listed only when something failed, not in every step.)"""
        try:
            return fn(*args)
        except EngineDeadError:  # not this step's fault: nothing can run any more, every request ends
            for rid in list(self.requests):
                self.abort_request(rid)
            raise
        except Exception as e:
            ids = request_ids()
            logger.exception("engine step failed for request(s) %s", ids)
            for rid in ids:
                self.abort_request(rid)
            self._failures.append((ids, e))
            return default

    def _admit_compiled(self) -> list[RequestOutput]:
        """Queue the requests whose grammar has compiled; end those whose grammar failed to."""
        idle = self._in_flight is None and not self.scheduler.has_work()
        ready, failed = self.structured.take_ready(wait_s=0.05 if idle else 0.0)
        for seq in ready:
            self.scheduler.add(seq)
        outputs = []
        for seq in failed:
            out = self.abort_request(seq.request.request_id)
            if out is not None:
                outputs.append(out)
        return outputs

    def _launch(self, sched: SchedulerOutput, meanwhile: Optional[Callable[[], None]] = None) -> _LaunchedStep:
        """Launch sched's step. meanwhile (the previous step's post-processing) runs while this
        step's grammar masks are filled in a worker thread, if it has any to fill."""
        self.num_steps += 1
        self.max_seqs_in_step = max(self.max_seqs_in_step, len(sched.seqs))
        bm = self.block_manager
        step = build_step_input(sched, bm.table_array, bm.block_size)

        rows: list[SamplingRow] = []
        row_seqs: list[Sequence] = []
        sample_from: list[int] = []
        num_logit_rows = 0
        constrained = reads_history = False
        now = time.time()
        # (runs for every sequence in every step: the block-hash registration is called only when a
        # block may have filled)
        cache, bs = (bm.cache_full_blocks if bm.enable_prefix_caching else None), bm.block_size
        for seq, num_new, completes in zip(sched.seqs, sched.num_new_tokens, sched.completes_prompt):
            req = seq.request
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.num_cached_tokens = seq.num_computed_tokens
            computed = seq.num_computed_tokens = seq.num_computed_tokens + num_new
            if cache is not None and computed // bs > seq.num_hashed_blocks:
                cache(seq)
            if not completes:
                continue
            constrained = constrained or req.grammar is not None
            reads_history = reads_history or req.reads_history
            for member in self._fork(seq) if seq.pending_forks else (seq,):  # forked siblings: the same logits row
                rows.append(self._sampling_row(member))
                row_seqs.append(member)
                sample_from.append(num_logit_rows)
            num_logit_rows += 1
        released, self._released_seeds = self._released_seeds, []
        # The grammar masks are filled after the forward pass is launched (see _pending_token).
        masks = (lambda out: self.structured.bitmask(row_seqs, self._pending_token, out, meanwhile)) if constrained else None
        sampled = self.runner.execute(with_sampling(step, rows, sample_from, released), grammar_mask=masks)
        step_no = self.num_steps
        for k, seq in enumerate(row_seqs):
            # every token it knows of is computed now; the one just sampled is the next
            seq.pending = PendingToken(step_no, k, seq.num_computed_tokens + 1 >= seq.request.token_limit)
        return _LaunchedStep(self.num_steps, row_seqs, sampled, not reads_history)

    def _pending_token(self, seq: Sequence) -> Optional[int]:
        """seq's token sampled by the step in flight and not appended yet (None if it has none).
        Reading it waits only for that step's sampling, not for the forward pass just launched."""
        p, flight = seq.pending, self._in_flight
        if p is None or flight is None or flight.sampled is None or p.step != flight.step:
            return None
        return flight.sampled.resolve().token_ids[p.row]

    def _finish(self, launched: _LaunchedStep, emit_unfinished: bool) -> list[RequestOutput]:
        """Read a launched step's tokens back and post-process them (stops, text, outputs)."""
        if launched.sampled is None:
            return []
        out = launched.sampled.resolve()
        now = time.time()
        touched: dict[str, Request] = {}  # requests to report (without emit_unfinished: those a sequence of which ended)
        step, append, bm = launched.step, self._append_token, self.block_manager
        cache, bs = (bm.cache_full_blocks if bm.enable_prefix_caching else None), bm.block_size
        for seq, token, logprob, top in zip(launched.row_seqs, out.token_ids, out.logprobs, out.top_logprobs):
            pending = seq.pending
            if pending is not None and pending.step == step:
                seq.pending = None  # (a later step may already have sampled its next token)
            if seq.status is _FINISHED:  # stopped by an earlier token, or aborted: this one is dropped
                continue
            append(seq, token, logprob, top, now)
            if cache is not None and seq.num_computed_tokens // bs > seq.num_hashed_blocks:  # (as in _launch)
                cache(seq)
            if emit_unfinished or seq.status is _FINISHED:
                req = seq.request
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = time.time()
                self.requests.pop(req.request_id, None)
                outputs.append(self._make_output(req, finished=True))
            elif emit_unfinished and req.params.output_kind != "final_only":
                outputs.append(self._make_output(req, finished=False))
        return outputs

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """seq plus, the first time its prompt completes, its n-1 siblings sharing its blocks."""
        if not seq.pending_forks:
            return [seq]
        req = seq.request
        members = [seq]
        for index in range(1, seq.pending_forks + 1):
            child = Sequence(req, index, list(seq.token_ids), seed=_sibling_seed(req.params, index))
            self.detokenizer.start(child)
            self.scheduler.add_forked(seq, child)
            req.seqs.append(child)
            members.append(child)
        seq.pending_forks = 0
        return members

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        history = seq.request.reads_history
        if seq.sampling_row is not None and not history:
            return seq.sampling_row  # nothing in it changes from step to step
        row = SamplingRow(
            params=seq.params,
            prompt_token_ids=seq.request.prompt_token_ids,
            output_token_ids=seq.output_token_ids if history else [],
            seed=seq.seed,
            eos_token_ids=self.eos_token_ids,
            key=seq.seq_id,
        )
        if not history:
            seq.sampling_row = row
        return row

    def _append_token(self, seq: Sequence, token: int, logprob: float, top: Optional[dict], now: float) -> None:
        # (runs for every sequence in every step: attributes are read once into locals)
        req = seq.request
        params = req.params
        token_ids = seq.token_ids
        token_ids.append(token)
        seq.cumulative_logprob += logprob
        if top is not None and params.logprobs is not None:
            seq.logprobs.append(top)
        self.total_generated_tokens += 1
        m = req.metrics
        last = m.last_token_time
        if m.first_token_time is None:
            m.first_token_time = now
        elif last is not None and seq.index == 0:
            m.inter_token_latencies.append(now - last)
        m.last_token_time = now

        if req.grammar is not None:
            end = self.structured.follow(seq)  # "stop": the grammar ended (with its EOS), whatever
            if end is not None:                 # ignore_eos / min_tokens say; "abort": broken
                return self._finish_seq(seq, end, None, drop_last=True)
        stop_token = None
        if not params.min_tokens or seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                stop_token = ("eos", None)
            elif params.stop_token_ids and token in params.stop_token_ids:
                stop_token = ("id", token)
        # Only stop strings need the text after every token; otherwise it is decoded when wanted.
        if params.stop and (stop_token is None or params.include_stop_str_in_output):
            stop_str = self.detokenizer.update(seq)
            if stop_str is not None:
                return self._finish_seq(seq, "stop", stop_str)
        if stop_token is not None:
            return self._finish_seq(seq, "stop", stop_token[1], drop_last=not params.include_stop_str_in_output)
        if len(token_ids) >= req.token_limit:  # max_tokens or max_model_len
            return self._finish_seq(seq, "length", None)

    def _finish_seq(self, seq: Sequence, reason: str, stop_reason, drop_last: bool = False) -> None:
        """seq ends: its text is completed (without its last token when drop_last: a stop token
        not shown, or a token its grammar ended on or rejected), its blocks freed."""
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.detokenizer.finish(seq, drop_last)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free seq's blocks and slot; its random stream goes with the next launch."""
        self.scheduler.finish(seq)
        if seq.seed is not None:
            self._released_seeds.append(seq.seq_id)

    def _make_output(self, req: Request, finished: bool) -> RequestOutput:
        # trusted: the engine's own, already valid data; validation would cost more than the rest of the
        # step at hundreds of requests.
        outputs = []
        delta = req.params.output_kind == "delta"
        want_logprobs = req.params.logprobs is not None
        for seq in sorted(req.seqs, key=lambda s: s.index) if len(req.seqs) > 1 else req.seqs:
            delta_text, delta_ids = self.detokenizer.take_delta(seq)
            if delta:  # only what is new: no copy of the output so far
                text, out_ids = delta_text, delta_ids
                logprobs = seq.logprobs[len(seq.logprobs) - len(delta_ids):] if want_logprobs else None
            else:
                text, out_ids = seq.text, seq.output_token_ids
                logprobs = list(seq.logprobs) if want_logprobs else None
            outputs.append(
                trusted(
                    CompletionOutput,
                    index=seq.index,
                    text=text,
                    token_ids=out_ids,
                    cumulative_logprob=seq.cumulative_logprob if seq.num_output_tokens else None,
                    logprobs=logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    text_delta=delta_text,
                    token_ids_delta=delta_ids,
                )
            )
        return trusted(
            RequestOutput,
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            metrics=req.metrics.to_metrics(),
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
            num_waiting=len(self.scheduler.waiting) + len(self.structured.compiling),
            kv_slots_allocated=bm.num_used_blocks * bs,
            kv_slots_holding_tokens=sum(filled.values()),
            prefix_cache_hit_rate=bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
            prefix_cache_hit_tokens=bm.prefix_hits,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
            max_seqs_in_step=self.max_seqs_in_step,
            total_prompt_tokens=self.total_prompt_tokens,
            total_generated_tokens=self.total_generated_tokens,
            **self._memory_stats,
        )

    def shutdown(self) -> None:
        for rid in list(self.requests):
            self.abort_request(rid)
        self._in_flight = None
        self.structured.shutdown()
        self.runner.release()


def _reads_history(p: SamplingParams) -> bool:
    """Only penalties and min_tokens read the generated tokens when sampling."""
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty or p.min_tokens)


def _sibling_seed(params: SamplingParams, index: int) -> Optional[int]:
    """Completion `index`'s seed: seed + index, wrapping so that it stays a valid seed."""
    return None if params.seed is None else (params.seed + index) % _SEED_MOD
