"""The slot pool and the host engine: frees without copies, re-rotation of moved keys only, growth keeps contents."""

from types import SimpleNamespace

import numpy as np
import pytest

from runtime.engine import CacheFull, HostEngine, SlotPool
from runtime.rope import Rope

ROPE = Rope((1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).tolist(), [2, 1, 1])
MODEL = SimpleNamespace(layers=3, kv_heads=2, head_dim=8, cache_dtype=np.float32)


def _kv(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, n, 8), dtype=np.float32) for _ in range(3)]


def test_reposition_rotates_only_moved_keys_from_the_raw_copy():
    engine = HostEngine(MODEL, capacity=8, rope=ROPE)
    slots = engine.pool.allocate(5)
    raw = _kv(5, 0)
    positions = np.tile(np.arange(10, 15), (3, 1))
    for i in range(3):  # what run() stores after a decoder call
        engine.keys_raw[i][:, :, slots] = raw[i]
        engine.keys[i][:, :, slots] = ROPE.rotate(raw[i], positions)
    engine.pool.positions[:, slots], engine.pool.written[slots] = positions, True
    assert engine.pool.past_mask().tolist() == [1] * 5 + [0] * 3

    engine.pool.free(slots[:2])  # evict the first two; the other three move down by 10
    assert engine.reposition(slots[2:], positions[:, 2:] - 10) == 3
    assert engine.pool.past_mask().tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    for i in range(3):
        np.testing.assert_array_equal(engine.keys[i][:, :, slots[2:]], ROPE.rotate(raw[i][:, :, 2:], positions[:, 2:] - 10))
    assert engine.reposition(slots[2:], positions[:, 2:] - 10) == 0  # nothing moved, nothing rewritten


def test_freed_slots_are_reused_and_growth_keeps_contents():
    engine = HostEngine(MODEL, capacity=4, rope=ROPE)
    first = engine.pool.allocate(4)
    values = _kv(4, 2)[0]
    engine.values[0][:] = values
    engine.pool.free(first[1:3])
    assert engine.pool.allocate(2).tolist() == [1, 2]
    grown = engine.pool.allocate(3)  # no room: the pool grows, contents stay in their slots
    engine._fit()
    assert engine.pool.capacity >= 7 and grown.tolist() == [4, 5, 6]
    np.testing.assert_array_equal(engine.values[0][:, :, [0, 3]], values[:, :, [0, 3]])
    assert engine.keys[0].shape[2] == engine.pool.capacity and engine.keys[0].flags.c_contiguous


def test_a_fixed_pool_refuses_to_grow():
    pool = SlotPool(4, growable=False)
    pool.allocate(3)
    with pytest.raises(CacheFull, match="--cache-capacity"):
        pool.allocate(2)


def test_decoder_and_prefill_sessions_map_one_copy_of_the_weights(tiny_graphs):
    from runtime.manifest import Manifest
    from runtime.model import Model

    model = Model(Manifest.load(tiny_graphs))
    model.session("decoder", {"new": 1})
    model.session("prefill", {"new": 16})
    model.session("prefill")
    weights = model.manifest["graphs"]["decoder"]["external_weights"]
    assert len(model._weights) == len(weights)  # one OrtValue per weight, whatever graph or session asked
    assert all(array.base is not None for _, array in model._weights.values())  # views of the mapped file
