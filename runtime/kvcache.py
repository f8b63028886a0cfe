"""The physical KV cache: a pool of slots in fixed buffers, written in place.

The decoder reads every slot and a mask says which ones hold live tokens, so slot order does not matter:
eviction frees slots (no compaction, no copy of the cache), new tokens take free slots, and re-positioning after
eviction rewrites only the keys whose position changed, from the pre-RoPE master copy.
"""

import numpy as np

from .rope import Rope


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, rope: Rope):
        self.layers, self.rope = layers, rope
        shape = (1, kv_heads, 0, head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(layers)]  # after RoPE: what the decoder reads
        self.keys_raw = [np.zeros(shape, np.float32) for _ in range(layers)]  # before RoPE: the master copy
        self.values = [np.zeros(shape, np.float32) for _ in range(layers)]
        self.positions = np.zeros((3, 0), np.int64)  # the position each slot's key is rotated to
        self.live = np.zeros(0, bool)  # holds a token of the retained context
        self.written = np.zeros(0, bool)  # its K/V have been computed
        self._grow(capacity)

    @property
    def capacity(self) -> int:
        return len(self.live)

    @property
    def size(self) -> int:
        return int(self.live.sum())

    def allocate(self, n: int) -> np.ndarray:
        free = np.flatnonzero(~self.live)
        if len(free) < n:
            self._grow(max(self.capacity + n - len(free), int(self.capacity * 1.25)))
            free = np.flatnonzero(~self.live)
        slots = free[:n]
        self.live[slots] = True
        return slots

    def free(self, slots: np.ndarray) -> None:
        self.live[slots] = False
        self.written[slots] = False

    def past_mask(self) -> np.ndarray:
        """int64 [capacity]: 1 where the decoder may attend (live tokens whose K/V exist)."""
        return (self.live & self.written).astype(np.int64)

    def write(self, slots: np.ndarray, positions: np.ndarray, keys, keys_raw, values) -> None:
        """Store new tokens' K/V (per layer [1, kv, S, hd]) in their slots, rotated to `positions` [3, S]."""
        for i in range(self.layers):
            self.keys[i][:, :, slots] = keys[i]
            self.keys_raw[i][:, :, slots] = keys_raw[i]
            self.values[i][:, :, slots] = values[i]
        self.positions[:, slots] = positions
        self.written[slots] = True

    def reposition(self, slots: np.ndarray, positions: np.ndarray) -> int:
        """Give the tokens in `slots` the `positions` [3, n]; re-rotate those that moved. Returns how many moved."""
        moved = self.written[slots] & (self.positions[:, slots] != positions).any(axis=0)
        slots, positions = slots[moved], positions[:, moved]
        if len(slots):
            for i in range(self.layers):
                self.keys[i][:, :, slots] = self.rope.rotate(self.keys_raw[i][:, :, slots], positions)
            self.positions[:, slots] = positions
        return len(slots)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        pad = ((0, 0), (0, 0), (0, extra), (0, 0))
        for buffers in (self.keys, self.keys_raw, self.values):
            for i, buffer in enumerate(buffers):
                buffers[i] = np.pad(buffer, pad)
        self.positions = np.pad(self.positions, ((0, 0), (0, extra)))
        self.live = np.pad(self.live, (0, extra))
        self.written = np.pad(self.written, (0, extra))
