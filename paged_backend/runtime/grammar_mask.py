"""Apply the step's grammar bitmask to the logits, on the logits' device."""

from __future__ import annotations

import numpy as np
import torch
import xgrammar as xgr


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> torch.Tensor:
    """Set to -inf every token of logits[rows[i]] that bitmask[i] forbids (in place; returns logits).

    The bitmask covers the model's whole vocabulary (padded ids included, and forbidden), so the
    logits' width is its size.
    """
    mask = torch.from_numpy(bitmask)
    full = torch.full((logits.shape[0], mask.shape[1]), -1, dtype=torch.int32)  # -1: all allowed
    full[rows] = mask
    xgr.apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True), vocab_size=logits.shape[1])
    return logits
