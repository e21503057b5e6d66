"""KV block ownership: block ids, reference counts, the free list and the prefix-cache hash table.

Policy lives in the scheduler; this class only answers "can these slots be had" and hands out
block ids. A full block is identified by the hash of (its parent block's hash, its token ids); a
new sequence whose tokens start with a cached chain reuses those blocks instead of recomputing
them. Freed blocks that carry a hash stay in the table (and on the free list, least recently freed
first) until they are handed out again, so a later request can still hit them.

Per-block state is kept as parallel lists indexed by block id, not one object per block: a GPU
cache has ~10^5 blocks, and that many live objects made each of Python's full garbage collections
(which run every few engine steps) cost milliseconds.

Each sequence's block table is also mirrored into one row of `table_array` (written here, where
the tables change), so the runner gathers a step's tables with one numpy index instead of
rebuilding hundreds of Python lists every step.

It never writes a sequence's num_computed_tokens: a prefix hit is reported to the scheduler.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from paged_backend.engine.sequence import Sequence
from paged_backend.runtime.step_input import table_width


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks  # set once the block is full and cached
        self.block_tokens: list[tuple[int, ...]] = [()] * num_blocks  # its tokens (to rule out collisions)
        # ref_count == 0 blocks, least recently freed first; OrderedDict for O(1) removal on a cache hit
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the runner
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found
        self.table_array = np.zeros((16, 16), dtype=np.int32)  # grows as needed
        self._free_rows: list[int] = list(range(16))

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- the block-table array --------------------------------------------------------------
    def _sync_table(self, seq: Sequence, start: int) -> None:
        """Copy seq.block_table[start:] into seq's row (taking a row first if it has none)."""
        rows, width = self.table_array.shape
        if seq.table_row < 0:
            if not self._free_rows:
                self._free_rows = list(range(rows, 2 * rows))
                rows *= 2
            seq.table_row = self._free_rows.pop()
            start = 0
        if len(seq.block_table) > width:
            width = max(2 * width, table_width(len(seq.block_table) * self.block_size, self.block_size))
        if self.table_array.shape != (rows, width):
            grown = np.zeros((rows, width), dtype=np.int32)
            grown[: self.table_array.shape[0], : self.table_array.shape[1]] = self.table_array
            self.table_array = grown
        self.table_array[seq.table_row, start : len(seq.block_table)] = seq.block_table[start:]

    # ---- allocation -------------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        h = self.hashes[block_id]
        if h is not None:  # evict its cache entry: it is being reused for other tokens
            if self.hash_to_block.get(h) == block_id:
                del self.hash_to_block[h]
            self.hashes[block_id], self.block_tokens[block_id] = None, ()
        self.ref_counts[block_id] = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free[block_id]
        self.ref_counts[block_id] += 1

    def _unref(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] < 0:
            raise AssertionError(f"block {block_id} freed twice")
        if self.ref_counts[block_id] == 0:
            self.free[block_id] = None

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached chain of full blocks of seq's tokens, leaving at least
        one token to compute (its logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = None
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            toks = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, toks)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.block_tokens[block_id] != toks:
                break
            hits.append(block_id)
            parent = h
        return hits

    def allocate_new(self, seq: Sequence, max_new_tokens: int) -> tuple[int, int] | None:
        """First allocation for a sequence with no blocks: take cached prefix blocks, then new
        blocks for up to max_new_tokens more tokens. Returns (tokens the prefix hit covers, tokens to
        compute this step (>= 1)), or None (nothing taken) when the blocks are not there."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        num_cached = len(hits) * self.block_size
        num_new = min(max_new_tokens, seq.num_tokens - num_cached)
        needed = self.blocks_needed(num_cached + num_new) - len(hits)
        hits_now_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        if needed + hits_now_free > len(self.free):
            return None
        for b in hits:
            self._ref(b)
        seq.block_table = hits + [self._take_free() for _ in range(needed)]
        self._sync_table(seq, 0)
        seq.num_hashed_blocks = len(hits)
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += num_cached
        return num_cached, num_new

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for num_new_tokens more tokens after seq's computed ones (copy-on-write the
        block they start in when it is shared). All or nothing."""
        table = seq.block_table
        total = seq.num_computed_tokens + num_new_tokens
        needed = max(0, self.blocks_needed(total) - len(table))
        first = seq.num_computed_tokens // self.block_size
        cow = first < len(table) and self.ref_counts[table[first]] > 1
        if needed + int(cow) > len(self.free):
            return False
        if not needed and not cow:
            return True
        start = len(seq.block_table)
        if cow:
            src = seq.block_table[first]
            dst = self._take_free()
            self._unref(src)
            seq.block_table[first] = dst
            self.pending_copies.append((src, dst))
            start = first
        seq.block_table.extend(self._take_free() for _ in range(needed))
        self._sync_table(seq, start)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks (n > 1 completions of one prompt)."""
        for b in parent.block_table:
            self._ref(b)
        child.block_table = list(parent.block_table)
        self._sync_table(child, 0)
        child.num_hashed_blocks = parent.num_hashed_blocks

    def free_seq(self, seq: Sequence) -> None:
        # Tail first, so that a sequence's last blocks are the first to be reused.
        for b in reversed(seq.block_table):
            self._unref(b)
        seq.block_table = []
        if seq.table_row >= 0:
            self._free_rows.append(seq.table_row)
            seq.table_row = -1
        seq.num_hashed_blocks = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's newly completed full blocks (their K/V now computed) in the hash table."""
        if not self.enable_prefix_caching:
            return
        # Only blocks whose tokens are all known: the newest one may be still on the device.
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if num_full <= seq.num_hashed_blocks:
            return
        bs = self.block_size
        parent = self.hashes[seq.block_table[seq.num_hashed_blocks - 1]] if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, num_full):
            block_id = seq.block_table[i]
            if self.hashes[block_id] is None:
                toks = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self.hashes[block_id], self.block_tokens[block_id] = chain_hash(parent, toks), toks
                self.hash_to_block.setdefault(self.hashes[block_id], block_id)
            parent = self.hashes[block_id]
        seq.num_hashed_blocks = num_full

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Reference counts equal the number of live block-table entries; free list == ref 0."""
        counts = [0] * self.num_blocks
        for s in seqs:
            for b in s.block_table:
                counts[b] += 1
        for b, ref_count in enumerate(self.ref_counts):
            if ref_count != counts[b]:
                raise AssertionError(f"block {b}: ref_count {ref_count} != {counts[b]} users")
            if (ref_count == 0) != (b in self.free):
                raise AssertionError(f"block {b}: free-list membership disagrees with ref_count")
        for s in seqs:
            if s.block_table and list(self.table_array[s.table_row, : len(s.block_table)]) != s.block_table:
                raise AssertionError(f"sequence {s.seq_id}: table_array row disagrees with its block table")
        for h, b in self.hash_to_block.items():
            if self.hashes[b] != h:
                raise AssertionError(f"hash table entry for block {b} is stale")
