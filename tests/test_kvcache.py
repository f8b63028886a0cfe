"""The slot pool: in-place writes, frees without copies, re-rotation of moved keys only, growth keeps contents."""

import numpy as np

from runtime.kvcache import KVCache
from runtime.rope import Rope

ROPE = Rope((1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).tolist(), [2, 1, 1])


def _kv(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, n, 8), dtype=np.float32) for _ in range(3)]


def test_write_reposition_and_free():
    cache = KVCache(layers=3, kv_heads=2, head_dim=8, capacity=8, rope=ROPE)
    slots = cache.allocate(5)
    raw, values = _kv(5, 0), _kv(5, 1)
    positions = np.tile(np.arange(10, 15), (3, 1))
    keys = [ROPE.rotate(k, positions) for k in raw]
    cache.write(slots, positions, keys, raw, values)
    assert cache.past_mask().tolist() == [1] * 5 + [0] * 3
    np.testing.assert_array_equal(cache.values[1][:, :, slots], values[1])

    # evict the first two; the other three move down by 10: only they are re-rotated, from the raw copy
    cache.free(slots[:2])
    moved = cache.reposition(slots[2:], positions[:, 2:] - 10)
    assert moved == 3 and cache.past_mask().tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    for i in range(3):
        np.testing.assert_allclose(cache.keys[i][:, :, slots[2:]], ROPE.rotate(raw[i][:, :, 2:], positions[:, 2:] - 10),
                                   rtol=0, atol=0)
    assert cache.reposition(slots[2:], positions[:, 2:] - 10) == 0  # nothing moved, nothing rewritten


def test_freed_slots_are_reused_and_growth_keeps_contents():
    cache = KVCache(layers=1, kv_heads=2, head_dim=8, capacity=4, rope=ROPE)
    first = cache.allocate(4)
    raw = _kv(4, 2)
    cache.write(first, np.zeros((3, 4), np.int64), raw[:1], raw[:1], raw[1:2])
    cache.free(first[1:3])
    assert cache.allocate(2).tolist() == [1, 2]
    grown = cache.allocate(3)  # no room: the pool grows, contents stay in their slots
    assert cache.capacity >= 7 and grown.tolist() == [4, 5, 6]
    np.testing.assert_array_equal(cache.values[0][:, :, [0, 3]], raw[1][:, :, [0, 3]])
    assert cache.keys[0].flags.c_contiguous
