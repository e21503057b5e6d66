"""The CPU decode path's K/V mirrors: each layer's padded decode batch, kept from one step to the next.

The reference decode attention reads every decode sequence's keys and values as one padded batch
[B, W * block_size, Hkv, D]. Gathering it from the paged cache in every layer of every step copies
each sequence's whole context, while from one step to the next it only gains each sequence's new
token. A mirror keeps that batch per layer cache (head-major, [B, Hkv, capacity, D] for K and for V, so that
one sequence's keys of one head are one contiguous run for the attention kernel) and, when a
step extends the previous one (the same sequences in the same order, each one token longer, on the
same blocks), appends the new tokens' rows, read back from the cache after `store_kv`. Any other step
(a sequence joins, leaves or moves; a block changes; a sequence outgrows the capacity) gathers as
before and refills the mirror. Measured on the 2-core dev box (SmolLM2-135M, fp32, ~300-token
contexts): the per-step gathers cost ~2.2 ms at one sequence and ~4.3 ms at four.

Mirrors live per thread (the engine's), keyed by their cache tensor and freed with it, and take at
most MAX_BYTES in all; past that a layer gathers every step as before.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field

import torch

SLACK_BLOCKS = 8  # capacity beyond the widest sequence at a refill: one refill per 8 blocks of growth
MAX_BYTES = 512 << 20

_state = threading.local()
_serials = itertools.count(1)


@dataclass(frozen=True)
class MirrorPlan:
    """What one step's decode batch needs to extend or refill the mirrors (built once per step)."""

    serial: int
    extends: int | None  # the serial of the previous step's plan when this step extends it, else None
    capacity: int  # tokens per sequence in a mirror
    width: int  # W * block_size: the tokens of this step's padded batch
    new_rows: torch.Tensor  # [2B]: the new tokens' K rows, then their V rows, in the [-1, Hkv * D] cache view
    pos: torch.Tensor  # [B]: their positions ctx_b - 1
    # what the next step compares against
    table: torch.Tensor  # [B, W] block ids, 0 past a sequence's own blocks
    valid: torch.Tensor  # [B, W] bool: the sequence's own blocks
    ctx: torch.Tensor  # [B, 1] context lengths
    dst_by_shape: dict = field(default_factory=dict, compare=False)  # (Hkv, V offset) -> dst_rows(...)

    def dst_rows(self, hkv: int, v_offset: int) -> torch.Tensor:
        """[2 * B * Hkv]: the new tokens' K rows (b, h), then their V rows, in the [-1, D] view of a mirror's
        buffer, whose V half starts v_offset rows in (built once per step and shape)."""
        key = (hkv, v_offset)
        if key not in self.dst_by_shape:
            b = self.pos.shape[0]
            starts = torch.arange(b * hkv, device=self.pos.device).view(b, hkv) * self.capacity
            k_rows = (starts + self.pos.view(-1, 1)).view(-1)
            self.dst_by_shape[key] = torch.cat((k_rows, k_rows + v_offset))
        return self.dst_by_shape[key]


def plan(table: torch.Tensor, valid: torch.Tensor, ctx: torch.Tensor, new_rows: torch.Tensor,
         block_size: int) -> MirrorPlan:
    """table [B, W] (0 past each sequence's blocks), valid [B, W], ctx [B, 1] int64, new_rows [2B] (the new
    tokens' K rows, then V rows, in the [-1, Hkv * D] cache view): this step's plan."""
    prev = getattr(_state, "prev", None)
    b, w = table.shape
    extends, capacity = None, (w + SLACK_BLOCKS) * block_size
    if prev is not None and prev.table.shape[0] == b and prev.table.shape[1] <= w and w * block_size <= prev.capacity:
        same_blocks = torch.equal(table[:, : prev.table.shape[1]].masked_fill(~prev.valid, 0), prev.table)
        if same_blocks and torch.equal(ctx, prev.ctx + 1):
            extends, capacity = prev.serial, prev.capacity
    mp = MirrorPlan(next(_serials), extends, capacity, w * block_size, new_rows, (ctx - 1).view(-1), table, valid, ctx)
    _state.prev = mp
    return mp


class Mirror:
    """One layer cache's mirror: `k` / `v` [B, width, Hkv, D] views; `current` when they already hold
    this step's batch (appended), else the caller gathers and calls `fill`."""

    def __init__(self, cache: torch.Tensor, numel: int):
        self.buf = torch.zeros(2, numel, dtype=cache.dtype, device=cache.device)
        self.serial = 0
        self.layout: tuple[int, int, int] | None = None
        self.current = False

    def bind(self, mp: MirrorPlan, b: int, row: int, hkv: int, d: int) -> None:
        if self.layout == (b, mp.capacity, mp.width):  # the views of the last step (most steps)
            return
        self.layout = (b, mp.capacity, mp.width)
        flat = self.buf[:, : b * mp.capacity * row].view(2, b, hkv, mp.capacity, d)
        self.full_k, self.full_v = flat[0], flat[1]
        self.k, self.v = (x.transpose(1, 2)[:, : mp.width] for x in (self.full_k, self.full_v))

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k / v [B, width, Hkv, D]: this step's gathered batch (finite past each context)."""
        self.full_k[:, :, k.shape[1]:].zero_()
        self.full_v[:, :, v.shape[1]:].zero_()
        self.k.copy_(k)
        self.v.copy_(v)


def lookup(kv_cache: torch.Tensor, mp: MirrorPlan) -> Mirror | None:
    """The mirror of kv_cache [num_blocks, 2, block_size, Hkv, D] for this step, appended to when the step
    extends the one it last served; None when it would not fit in MAX_BYTES."""
    entries: dict[int, Mirror] = _state.__dict__.setdefault("entries", {})
    _, _, _, hkv, d = kv_cache.shape
    row = hkv * d
    b = mp.pos.shape[0]
    m = entries.get(id(kv_cache))
    need = b * mp.capacity * row
    # (re)allocated when too small, or 4x too large at a refill: a burst of sequences does not keep its
    # high-water mark for good
    if m is None or m.buf.shape[1] < need or (mp.extends is None and m.buf.shape[1] > 4 * need):
        others = sum(e.buf.numel() * e.buf.element_size() for key, e in entries.items() if key != id(kv_cache))
        if others + 2 * need * kv_cache.element_size() > MAX_BYTES:
            entries.pop(id(kv_cache), None)
            return None
        if m is None:  # the cache's first mirror: freed with the cache (engine shut down)
            weakref.finalize(kv_cache, entries.pop, id(kv_cache), None)
        m = entries[id(kv_cache)] = Mirror(kv_cache, need)
    m.bind(mp, b, row, hkv, d)
    m.current = mp.extends is not None and m.serial == mp.extends
    if m.current:
        new = kv_cache.view(-1, row).index_select(0, mp.new_rows).view(-1, d)
        m.buf.view(-1, d).index_copy_(0, mp.dst_rows(hkv, m.buf.shape[1] // d), new)
    m.serial = mp.serial
    return m
