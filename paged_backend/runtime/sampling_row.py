"""What the sampler needs to know about one sequence this step (plain data: no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from paged_backend.params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # only filled when sampling reads the history (penalties, min_tokens)
    # The row's own random stream (None: the shared default generator). The sampler seeds a
    # torch.Generator with it the first time it sees `key` and keeps drawing from that one while
    # the key lives, so a sequence's tokens depend only on its seed, never on the batch.
    seed: Optional[int] = None
    # Masked (with params.stop_token_ids) while len(output_token_ids) < params.min_tokens.
    eos_token_ids: set[int] = field(default_factory=set)
    key: int = 0  # the sequence this row samples for (its generator's key in the sampler)
