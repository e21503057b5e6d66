"""Request and sequence state: what the scheduler and block manager move around.

Owners: the block manager writes block_table / table_row / num_hashed_blocks, the detokenizer
`detok`, the scheduler `status` and num_computed_tokens when a sequence is admitted (the prefix hit
the block manager reports), preempted or released; the engine advances num_computed_tokens after a
step and writes everything else.

A request with n > 1 starts as one sequence that prefills the prompt; when the prompt is done the
engine forks it into n sequences that share the prompt's KV blocks (copy-on-write).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

from paged_backend.outputs import RequestMetrics, trusted
from paged_backend.params import SamplingParams
from paged_backend.runtime.sampling_row import SamplingRow

if TYPE_CHECKING:
    from paged_backend.engine.detokenizer import DecodeState

_seq_counter = itertools.count()


class PendingToken(NamedTuple):  # a tuple: one is made per sampled sequence per step
    """A token sampled on the device and not read back yet (the engine overlaps the next step with
    it): its K/V is computed in the next step from the device copy."""

    step: int  # the step that sampled it
    row: int  # its row in that step's sampled ids
    is_last: bool  # it ends the sequence by length: nothing more to compute for it


@dataclass(slots=True)
class RequestTimes:
    """A request's timing as the engine records it: a plain object, written for every token (a
    pydantic model's attribute writes cost more than the rest of a token's bookkeeping); outputs
    carry it as `RequestMetrics`."""

    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    inter_token_latencies: list[float] = field(default_factory=list)

    def to_metrics(self) -> RequestMetrics:
        # (the latency list is shared, not copied: it only grows, and copying it for every streamed
        # output would cost O(tokens) per request per step)
        return trusted(
            RequestMetrics, arrival_time=self.arrival_time, first_scheduled_time=self.first_scheduled_time,
            first_token_time=self.first_token_time, last_token_time=self.last_token_time,
            finished_time=self.finished_time, inter_token_latencies=self.inter_token_latencies,
        )


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestTimes = field(default_factory=RequestTimes)
    seqs: list["Sequence"] = field(default_factory=list)
    num_cached_tokens: int = 0
    grammar: Any = None  # future of the compiled grammar (structured outputs), None if unconstrained
    # Fixed at admission, read for every sequence in every step: a sequence of this request ends by length
    # once it holds token_limit tokens (max_tokens or max_model_len); reads_history: its sampling reads
    # the generated tokens (penalties, min_tokens), so it is rebuilt each step and steps do not overlap.
    token_limit: int = 1 << 62  # the engine sets it
    reads_history: bool = False

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        if len(seqs) == 1:  # (n == 1, the common case, without a generator)
            return seqs[0].finished and self.params.n == 1
        return all(s.finished for s in seqs) and len(seqs) == self.params.n


@dataclass(eq=False, slots=True)
class Sequence:
    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]
    seed: Optional[int] = None  # its sampler's random stream (None: unseeded)
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    table_row: int = -1  # its row in the block manager's block-table array while it holds blocks
    num_hashed_blocks: int = 0  # leading full blocks already registered in the prefix cache
    pending_forks: int = 0  # siblings still to fork off once the prompt is prefilled
    pending: Optional[PendingToken] = None
    sampling_row: Optional[SamplingRow] = None  # the sampler's row for it, kept when it never changes
    grammar: Any = None  # its grammar matcher (structured outputs), made when first sampled
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    detok: Optional[DecodeState] = None  # the detokenizer's (text and offsets); only it writes them

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_total_tokens(self) -> int:
        """Known tokens plus the one still on the device."""
        return len(self.token_ids) + (self.pending is not None)

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def params(self) -> SamplingParams:
        return self.request.params
