"""Batched logits transforms used by the sampler, one function per concept.

Every function takes logits ``[N, V]`` (float32) and per-row parameters as ``[N]`` tensors on the
same device, and returns new logits (inputs are never modified). A row whose parameter is the
"off" value (penalty 1 / 0, top_k 0, top_p 1, min_p 0) comes out unchanged, so one batched pass
serves a batch that mixes requests with different settings. Removed tokens are set to -inf.

Semantics follow vLLM:
- repetition penalty over tokens seen in prompt or output: positive logits are divided by it,
  the others multiplied;
- presence / frequency penalties over output tokens: ``logit -= presence*(count>0) + frequency*count``;
- top-k keeps every token whose logit is >= the k-th largest (ties at the k-th value survive);
- top-p keeps the smallest prefix of the descending-sorted distribution whose mass reaches top_p
  (always at least the most likely token; ties ordered by token id);
- min-p drops tokens whose probability is below ``min_p * max probability``.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[N, V]`` int counts of each token id in each row's list, built with a single scatter.

    Ids outside ``[0, V)`` (e.g. padding or out-of-vocab ids) are ignored.
    """
    n = len(token_lists)
    counts = torch.zeros((n, vocab_size + 1), dtype=torch.int32, device=device)
    lengths = [len(t) for t in token_lists]
    total = sum(lengths)
    if total:
        flat = torch.tensor([t for toks in token_lists for t in toks], dtype=torch.long)
        flat = torch.where((flat >= 0) & (flat < vocab_size), flat, vocab_size)  # trash column V
        row = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))
        counts.view(-1).index_add_(
            0,
            (row * (vocab_size + 1) + flat).to(device),
            torch.ones(total, dtype=torch.int32, device=device),
        )
    return counts[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """``seen``: bool ``[N, V]`` (token occurs in prompt or output); ``penalty``: ``[N]``, 1 = off."""
    p = penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(
    logits: torch.Tensor, output_counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """``output_counts``: ``[N, V]`` counts of each token in the output so far."""
    counts = output_counts.to(logits.dtype)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_token_mask(logits: torch.Tensor, rows: list[int], token_ids: list[list[int]]) -> torch.Tensor:
    """Set ``logits[rows[i], token_ids[i]]`` to -inf (used for min_tokens: hide EOS / stop ids)."""
    v = logits.shape[1]
    pairs = [(row, t) for row, ids in zip(rows, token_ids) for t in ids if 0 <= t < v]
    if not pairs:
        return logits
    out = logits.clone()
    idx = torch.tensor(pairs, dtype=torch.long).to(logits.device)
    out[idx[:, 0], idx[:, 1]] = NEG_INF
    return out


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; callers pass 1.0 for greedy rows (never 0)."""
    return logits / temperature.unsqueeze(1)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """``top_k``: ``[N]`` long, values in ``[1, V]`` keep that many, 0 = off.

    ``max_k`` is ``top_k.max()`` known on the host (avoids a device sync); 0 means no row filters.
    """
    if max_k <= 0:
        return logits
    v = logits.shape[1]
    max_k = min(max_k, v)
    top_vals = logits.topk(max_k, dim=1).values                               # [N, max_k] descending
    k_idx = (top_k.clamp(1, max_k) - 1).unsqueeze(1)
    kth = top_vals.gather(1, k_idx)                                           # [N, 1]
    kth = torch.where(top_k.unsqueeze(1) > 0, kth, torch.full_like(kth, NEG_INF))
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``top_p``: ``[N]`` in (0, 1]; rows with 1.0 are left untouched (no rounding-error cuts)."""
    sorted_logits, order = logits.sort(dim=1, descending=True, stable=True)
    sorted_probs = sorted_logits.softmax(dim=1)
    mass_before = sorted_probs.cumsum(dim=1) - sorted_probs                   # exclusive prefix sum
    drop_sorted = mass_before >= top_p.unsqueeze(1)
    drop_sorted[:, 0] = False                                                 # keep at least one
    drop_sorted &= (top_p < 1.0).unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """``min_p``: ``[N]`` in [0, 1]; 0 = off. Ratio to the max is unaffected by renormalisation."""
    probs = logits.softmax(dim=1)
    threshold = min_p.unsqueeze(1) * probs.max(dim=1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)
