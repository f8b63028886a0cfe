"""Where the KV cache lives and how a decoder step runs over it.

Both engines keep the cache as a pool of slots with a mask (slot order does not matter to attention: positions
live in the rotated keys), so eviction frees slots and never moves the cache.

- `HostEngine`: numpy buffers, shapes that follow the stream (CPU provider default).
- `StaticEngine`: device buffers written in place through IO binding, and one session per fixed shape set
  (prefill length, single-token decode, cache capacity), so MIGraphX compiles each graph once. The same code runs
  on the CPU provider in tests.
"""

import numpy as np
import onnxruntime as ort

from .model import Model
from .rope import Rope


class CacheFull(Exception):
    pass


class SlotPool:
    def __init__(self, capacity: int, growable: bool):
        self.live = np.zeros(capacity, bool)  # holds a token of the retained context
        self.written = np.zeros(capacity, bool)  # its K/V have been computed
        self.positions = np.zeros((3, capacity), np.int64)  # the position each slot's key is rotated to
        self.growable = growable

    @property
    def capacity(self) -> int:
        return len(self.live)

    @property
    def size(self) -> int:
        return int(self.live.sum())

    def allocate(self, n: int) -> np.ndarray:
        free = np.flatnonzero(~self.live)
        if len(free) < n:
            if not self.growable:
                raise CacheFull(f"the KV cache holds {self.capacity} tokens and the stream needs more; "
                                "pass a larger --cache-capacity")
            self.grow(max(self.capacity + n - len(free), int(self.capacity * 1.25)))
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

    def moved(self, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Which of the written `slots` must be re-rotated to reach `positions` [3, n]."""
        return self.written[slots] & (self.positions[:, slots] != positions).any(axis=0)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.live = np.pad(self.live, (0, extra))
        self.written = np.pad(self.written, (0, extra))
        self.positions = np.pad(self.positions, ((0, 0), (0, extra)))


class HostEngine:
    def __init__(self, model: Model, capacity: int, rope: Rope):
        self.model, self.rope = model, rope
        self.pool = SlotPool(capacity, growable=True)
        shape, dtype = (1, model.kv_heads, capacity, model.head_dim), model.cache_dtype
        self.keys = [np.zeros(shape, dtype) for _ in range(model.layers)]  # after RoPE: what the decoder reads
        self.keys_raw = [np.zeros(shape, dtype) for _ in range(model.layers)]  # before RoPE: the master copy
        self.values = [np.zeros(shape, dtype) for _ in range(model.layers)]

    def run(self, embeds: np.ndarray, deepstack: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One decoder call over new tokens (embeds [S, H], deepstack [n, S, H], positions [3, S]) whose K/V go
        to `slots`; returns the last token's logits [V]."""
        self._fit()
        out = self.model.step(embeds[None], deepstack[:, None], positions[:, None], self.pool.past_mask()[None],
                              np.ones((1, len(slots)), np.int64), self.keys, self.values)
        for i in range(self.model.layers):
            self.keys[i][:, :, slots] = out.keys[i]
            self.keys_raw[i][:, :, slots] = out.keys_raw[i]
            self.values[i][:, :, slots] = out.values[i]
        self.pool.positions[:, slots] = positions
        self.pool.written[slots] = True
        return out.logits[0]

    def reposition(self, slots: np.ndarray, positions: np.ndarray) -> int:
        """Give the tokens in `slots` the `positions` [3, n]; re-rotate those that moved. Returns how many moved."""
        moved = self.pool.moved(slots, positions)
        slots, positions = slots[moved], positions[:, moved]
        if len(slots):
            for i in range(self.model.layers):
                raw = self.keys_raw[i][:, :, slots].astype(np.float32)  # rotate in fp32, as the graphs do
                self.keys[i][:, :, slots] = self.rope.rotate(raw, positions)
            self.pool.positions[:, slots] = positions
        return len(slots)

    def _fit(self) -> None:
        """Follow the pool if it grew (a one-time copy; the steady state never grows)."""
        extra = self.pool.capacity - self.keys[0].shape[2]
        if extra:
            pad = ((0, 0), (0, 0), (0, extra), (0, 0))
            for buffers in (self.keys, self.keys_raw, self.values):
                buffers[:] = [np.pad(b, pad) for b in buffers]


class StaticEngine:
    """Fixed shapes: decoder sessions for `prefill` new tokens and for 1, a cache of `capacity` slots on the
    session's device. Per step the host sends the new tokens' inputs and reads the logits; nothing else crosses."""

    def __init__(self, model: Model, capacity: int, prefill: int):
        self.model, self.prefill = model, prefill
        self.pool = SlotPool(capacity, growable=False)
        self.scratch = capacity  # one extra slot where padded tokens' K/V land, never attended
        cap = capacity + 1
        self.device = model.device
        layers, shape = model.layers, (1, model.kv_heads, cap, model.head_dim)
        dtype = model.cache_dtype

        def buffer(shape_, dt=dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape_), dt, self.device, model.device_id)

        self.cache = {f"{part}.{i}": buffer(shape) for part in ("key", "key_raw", "value") for i in range(layers)}
        self.mask = buffer((1, cap), np.int64)
        self.mask.update_inplace(np.zeros((1, cap), np.int64))
        for value in self.cache.values():
            value.update_inplace(np.zeros(shape, dtype))
        dims = {"batch": 1, "past": cap}
        vocab = model.manifest["text"]["vocab_size"]
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([1, vocab], np.float32, "cpu", 0)  # f32 in all dtypes
        # Everything that lives on the device is bound once per shape set; a step only rebinds its host inputs.
        self.calls = {n: self._bind(n, dims, buffer) for n in sorted({prefill, 1})}
        rotate = model.session("cache_rope", {"past": cap})
        self.rotate = (rotate, rotate.io_binding())
        for i in range(layers):
            self.rotate[1].bind_ortvalue_input(f"key_raw.{i}", self.cache[f"key_raw.{i}"])
            self.rotate[1].bind_ortvalue_output(f"key.{i}", self.cache[f"key.{i}"])
        self.host_bytes = 0  # bytes copied between host and device by run(): bounded by the new tokens

    def _bind(self, n: int, dims: dict, buffer) -> list:
        """(session, binding) of the decoder and of cache_write for steps of n new tokens; the new K/V pass between
        them through device buffers, and cache_write's outputs alias the cache it reads (written in place)."""
        model = self.model
        new = {f"new_{part}.{i}": buffer((1, model.kv_heads, n, model.head_dim))
               for part in ("key", "key_raw", "value") for i in range(model.layers)}
        decoder_session = model.session(model.step_graph(n), {**dims, "new": n})
        decoder = decoder_session.io_binding()
        decoder.bind_ortvalue_input("past_mask", self.mask)
        for i in range(model.layers):
            decoder.bind_ortvalue_input(f"past_key.{i}", self.cache[f"key.{i}"])
            decoder.bind_ortvalue_input(f"past_value.{i}", self.cache[f"value.{i}"])
        for name, value in new.items():
            decoder.bind_ortvalue_output(name, value)
        decoder.bind_ortvalue_output("logits", self.logits)  # the one output that comes back to the host
        writer_session = model.session("cache_write", {"past": dims["past"], "new": n})
        writer = writer_session.io_binding()
        for name, value in self.cache.items():
            writer.bind_ortvalue_input(name, value)
            writer.bind_ortvalue_output(name.replace(".", "_out.", 1), value)
        for name, value in new.items():
            writer.bind_ortvalue_input(name, value)
        writer.bind_ortvalue_input("mask", self.mask)
        writer.bind_ortvalue_output("mask_out", self.mask)
        return [(decoder_session, decoder), (writer_session, writer)]

    def run(self, embeds: np.ndarray, deepstack: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        n = len(slots)
        if n == 1:
            return self._call(1, embeds, deepstack, positions, slots, np.ones(1, np.int64))
        logits = None
        for start in range(0, n, self.prefill):  # a prompt longer than the prefill length goes in pieces
            end = min(start + self.prefill, n)
            pad = self.prefill - (end - start)  # left padding keeps the last real token at the last position
            pick = np.concatenate([np.full(pad, start), np.arange(start, end)])
            real = np.concatenate([np.zeros(pad, np.int64), np.ones(end - start, np.int64)])
            logits = self._call(self.prefill, embeds[pick], deepstack[:, pick], positions[:, pick],
                                np.where(real == 1, slots[pick], self.scratch), real)
        return logits

    def _call(self, n, embeds, deepstack, positions, slots, real) -> np.ndarray:
        model, ((decoder_session, decoder), (writer_session, writer)) = self.model, self.calls[n]
        feeds = {"inputs_embeds": embeds[None].astype(model.float_dtype),
                 "deepstack_embeds": deepstack[:, None].astype(model.float_dtype),
                 "position_ids": np.ascontiguousarray(positions[:, None]), "new_mask": real[None]}
        for name, array in feeds.items():
            decoder.bind_cpu_input(name, array)
            self.host_bytes += array.nbytes
        decoder_session.run_with_iobinding(decoder)
        logits = self.logits.numpy()[0].copy()  # the buffer is a view the next step overwrites
        self.host_bytes += logits.nbytes

        # scatter the new K/V and mask bits into their slots, in place on the device
        slots = slots.astype(np.int64)
        writer.bind_cpu_input("slots", slots)
        writer.bind_cpu_input("new_mask", real)
        self.host_bytes += slots.nbytes + real.nbytes
        writer_session.run_with_iobinding(writer)
        written = slots[real == 1]
        self.pool.positions[:, written] = positions[:, real == 1]
        self.pool.written[written] = True
        return logits

    def reposition(self, slots: np.ndarray, positions: np.ndarray) -> int:
        """After an eviction: new positions for the kept tokens and the mask for freed slots, once per chunk.
        Every slot is rotated from its pre-RoPE copy (a fixed shape; free slots rotate harmlessly)."""
        moved = int(self.pool.moved(slots, positions).sum())
        self.pool.positions[:, slots] = positions
        mask = np.concatenate([self.pool.past_mask(), [0]])[None]
        self.mask.update_inplace(mask)
        self.host_bytes += mask.nbytes
        if moved:
            all_positions = np.concatenate([self.pool.positions, np.zeros((3, 1), np.int64)], axis=1)
            session, binding = self.rotate
            binding.bind_cpu_input("positions", all_positions)
            self.host_bytes += all_positions.nbytes
            session.run_with_iobinding(binding)
        return moved
