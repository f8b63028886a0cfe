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


class HostRows:
    """The host cache of one stream or of many, one row each: per layer keys after RoPE (what the decoder reads),
    keys before RoPE (the master copy for re-positioning) and values, [rows, kv, capacity, hd]. A batched decode
    step passes a run of rows to the decoder as one slice: a view, never a copy of anyone's cache."""

    def __init__(self, model: Model, capacity: int, rows: int = 1):
        self.model = model
        shape, dtype = (rows, model.kv_heads, capacity, model.head_dim), model.cache_dtype
        self.keys = [np.zeros(shape, dtype) for _ in range(model.layers)]
        self.keys_raw = [np.zeros(shape, dtype) for _ in range(model.layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(model.layers)]
        self.taken = [False] * rows

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def attach(self) -> int:
        """A free row for a new stream (the rows double when none is free: a one-time copy)."""
        if all(self.taken):
            extra = len(self.taken) or 1
            self._pad(rows=extra)
            self.taken += [False] * extra
        row = self.taken.index(False)
        self.taken[row] = True
        return row

    def detach(self, row: int) -> None:
        self.taken[row] = False

    def fit(self, capacity: int) -> None:
        """Grow every row to `capacity` slots if it is larger (a one-time copy; the steady state never grows)."""
        if capacity > self.capacity:
            self._pad(slots=capacity - self.capacity)

    def _pad(self, rows: int = 0, slots: int = 0) -> None:
        pad = ((0, rows), (0, 0), (0, slots), (0, 0))
        for buffers in (self.keys, self.keys_raw, self.values):
            buffers[:] = [np.pad(b, pad) for b in buffers]


class HostEngine:
    def __init__(self, model: Model, capacity: int, rope: Rope, rows: HostRows | None = None):
        """A stream's cache: its own `HostRows`, or a row of `rows` shared with other streams (batched decoding)."""
        self.model, self.rope = model, rope
        self.pool = SlotPool(capacity, growable=True)
        self.rows = rows if rows is not None else HostRows(model, capacity)
        self.rows.fit(capacity)
        self.row = self.rows.attach()

    # This stream's row of each layer: [1, kv, capacity, hd] views of the shared buffers.
    @property
    def keys(self) -> list[np.ndarray]:
        return [b[self.row:self.row + 1] for b in self.rows.keys]

    @property
    def keys_raw(self) -> list[np.ndarray]:
        return [b[self.row:self.row + 1] for b in self.rows.keys_raw]

    @property
    def values(self) -> list[np.ndarray]:
        return [b[self.row:self.row + 1] for b in self.rows.values]

    def past_mask(self) -> np.ndarray:
        """int64 [rows capacity]: the pool's mask, zero beyond it (a shared cache may have grown for another row)."""
        mask = np.zeros(self.rows.capacity, np.int64)
        mask[:self.pool.capacity] = self.pool.past_mask()
        return mask

    def run(self, embeds: np.ndarray, deepstack: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One decoder call over new tokens (embeds [S, H], deepstack [n, S, H], positions [3, S]) whose K/V go
        to `slots`; returns the last token's logits [V]."""
        self._fit()
        out = self.model.step(embeds[None], deepstack[:, None], positions[:, None], self.past_mask()[None],
                              np.ones((1, len(slots)), np.int64), self.keys, self.values)
        self.store(out, 0, positions, slots)
        return out.logits[0]

    def store(self, out, index: int, positions: np.ndarray, slots: np.ndarray) -> None:
        """Keep row `index` of a decoder call's new K/V (`out`: StepOutput) in `slots` of this stream's row."""
        for i in range(self.model.layers):
            self.rows.keys[i][self.row, :, slots] = out.keys[i][index].swapaxes(0, 1)
            self.rows.keys_raw[i][self.row, :, slots] = out.keys_raw[i][index].swapaxes(0, 1)
            self.rows.values[i][self.row, :, slots] = out.values[i][index].swapaxes(0, 1)
        self.pool.positions[:, slots] = positions
        self.pool.written[slots] = True

    def reposition(self, slots: np.ndarray, positions: np.ndarray) -> int:
        """Give the tokens in `slots` the `positions` [3, n]; re-rotate those that moved. Returns how many moved."""
        moved = self.pool.moved(slots, positions)
        slots, positions = slots[moved], positions[:, moved]
        if len(slots):
            for raw, keys in zip(self.rows.keys_raw, self.rows.keys):
                rotated = self.rope.rotate(raw[self.row, :, slots].swapaxes(0, 1).astype(np.float32), positions)
                keys[self.row, :, slots] = rotated.swapaxes(0, 1)  # rotated in fp32, as the graphs do
            self.pool.positions[:, slots] = positions
        return len(slots)

    def _fit(self) -> None:
        """Follow the pool if it grew."""
        self.rows.fit(self.pool.capacity)

    def close(self) -> None:
        """The stream is done: its row is free for another."""
        self.rows.detach(self.row)


class DeviceRows:
    """The device-resident cache of one stream or of many (static path): per layer key, key_raw and value
    [rows, kv, capacity + 1, hd], allocated once (the last slot of each row is that row's scratch slot, where padded
    tokens' K/V land, never attended). Graphs are bound to a run of rows by address (a view): a stream's B=1
    calls to its own row, a batched decode step to the run of rows it serves, so no cache is ever copied."""

    PARTS = ("key", "key_raw", "value")

    def __init__(self, model: Model, capacity: int, rows: int = 1):
        self.model, self.capacity, self.slots = model, capacity, capacity + 1
        self.device, self.device_id = model.device, model.device_id
        self.dtype = np.dtype(model.cache_dtype)
        shape = [rows, model.kv_heads, self.slots, model.head_dim]
        zeros = np.zeros(shape, self.dtype)
        self.buffers = {}
        for part in self.PARTS:
            for i in range(model.layers):
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, self.device_id)
                value.update_inplace(zeros)
                self.buffers[f"{part}.{i}"] = value
        self.row_bytes = model.kv_heads * self.slots * model.head_dim * self.dtype.itemsize
        self.taken = [False] * rows

    def attach(self) -> int:
        if all(self.taken):
            raise CacheFull(f"all {len(self.taken)} cache rows are in use")
        row = self.taken.index(False)
        self.taken[row] = True
        return row

    def detach(self, row: int) -> None:
        self.taken[row] = False

    def new_buffers(self, n: int, batch: int = 1) -> dict:
        """Device buffers for a step's new K/V: new_{part}.{i} [batch, kv, n, hd]."""
        shape = [batch, self.model.kv_heads, n, self.model.head_dim]
        return {f"new_{part}.{i}": ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device,
                                                                             self.device_id)
                for part in self.PARTS for i in range(self.model.layers)}

    def bind(self, binding, name: str, buffer: str, row: int, count: int = 1, output: bool = False) -> None:
        """Bind graph input (or output) `name` to rows [row, row + count) of `buffer` (e.g. "key.3")."""
        shape = [count, self.model.kv_heads, self.slots, self.model.head_dim]
        address = self.buffers[buffer].data_ptr() + row * self.row_bytes
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.device, self.device_id, self.dtype, shape, address)


class StaticEngine:
    """Fixed shapes: decoder sessions for `prefill` new tokens and for 1, a cache of `capacity` slots on the
    session's device (its own `DeviceRows`, or a row of one shared with other streams for batched decoding).
    Per step the host sends the new tokens' inputs and reads the logits; nothing else crosses."""

    def __init__(self, model: Model, capacity: int, prefill: int, rows: DeviceRows | None = None):
        self.model, self.prefill = model, prefill
        self.pool = SlotPool(capacity, growable=False)
        self.rows = rows if rows is not None else DeviceRows(model, capacity)
        assert self.rows.capacity == capacity, "a shared cache serves streams of one capacity"
        self.row = self.rows.attach()
        try:
            self._setup(model, capacity, prefill)
        except BaseException:  # a session that cannot load: the row goes back
            self.rows.detach(self.row)
            raise
        self.host_bytes = 0  # bytes copied between host and device by run(): bounded by the new tokens

    def _setup(self, model: Model, capacity: int, prefill: int) -> None:
        self.scratch = capacity  # the row's extra slot
        cap = capacity + 1
        self.device, self.device_id = model.device, model.device_id
        self.mask = ort.OrtValue.ortvalue_from_shape_and_type([1, cap], np.int64, self.device, self.device_id)
        self.mask.update_inplace(np.zeros((1, cap), np.int64))
        vocab = model.manifest["text"]["vocab_size"]
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([1, vocab], np.float32, "cpu", 0)  # f32 in all dtypes
        # Everything that lives on the device is bound once per shape set; a step only rebinds its host inputs.
        self.new: dict[int, dict] = {}  # the new K/V of this engine's own steps, by step size
        self.calls = {n: self._bind(n) for n in sorted({prefill, 1})}
        rotate = model.session("cache_rope", {"past": cap})
        self.rotate = (rotate, rotate.io_binding())
        for i in range(model.layers):
            self.rows.bind(self.rotate[1], f"key_raw.{i}", f"key_raw.{i}", self.row)
            self.rows.bind(self.rotate[1], f"key.{i}", f"key.{i}", self.row, output=True)

    def _bind(self, n: int) -> list:
        """(session, binding) of the decoder and of cache_write for steps of n new tokens; the new K/V pass between
        them through device buffers, and cache_write's outputs alias the cache it reads (written in place)."""
        model, rows, cap = self.model, self.rows, self.rows.slots
        new = self.new[n] = rows.new_buffers(n)
        decoder_session = model.session(model.step_graph(n), {"batch": 1, "past": cap, "new": n})
        decoder = decoder_session.io_binding()
        decoder.bind_ortvalue_input("past_mask", self.mask)
        for i in range(model.layers):
            rows.bind(decoder, f"past_key.{i}", f"key.{i}", self.row)
            rows.bind(decoder, f"past_value.{i}", f"value.{i}", self.row)
        for name, value in new.items():
            decoder.bind_ortvalue_output(name, value)
        decoder.bind_ortvalue_output("logits", self.logits)  # the one output that comes back to the host
        writer_session = model.session("cache_write", {"past": cap, "new": n})
        writer = writer_session.io_binding()
        for name in rows.buffers:
            rows.bind(writer, name, name, self.row)
            rows.bind(writer, name.replace(".", "_out.", 1), name, self.row, output=True)
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
        model, ((decoder_session, decoder), _) = self.model, self.calls[n]
        feeds = {"inputs_embeds": embeds[None].astype(model.float_dtype),
                 "deepstack_embeds": deepstack[:, None].astype(model.float_dtype),
                 "position_ids": np.ascontiguousarray(positions[:, None]), "new_mask": real[None]}
        for name, array in feeds.items():
            decoder.bind_cpu_input(name, array)
            self.host_bytes += array.nbytes
        decoder_session.run_with_iobinding(decoder)
        logits = self.logits.numpy()[0].copy()  # the buffer is a view the next step overwrites
        self.host_bytes += logits.nbytes
        self.write(n, positions, slots, real)
        return logits

    def write(self, n: int, positions: np.ndarray, slots: np.ndarray, real: np.ndarray, new: dict | None = None,
              index: int = 0) -> None:
        """Scatter a step's new K/V and mask bits into their slots, in place on the device. The new K/V are this
        engine's own buffers for n tokens, or row `index` of a batched step's `new` buffers [b, kv, n, hd]."""
        session, writer = self.calls[n][1]
        if new is not None:
            for name, value in new.items():
                shape = [1, *value.shape()[1:]]
                address = value.data_ptr() + index * int(np.prod(shape)) * self.rows.dtype.itemsize
                writer.bind_input(name, self.device, self.device_id, self.rows.dtype, shape, address)
        slots = slots.astype(np.int64)
        writer.bind_cpu_input("slots", slots)
        writer.bind_cpu_input("new_mask", real)
        self.host_bytes += slots.nbytes + real.nbytes
        try:
            session.run_with_iobinding(writer)
        finally:
            if new is not None:  # back to this engine's own buffers for its next single step
                for name, value in self.new[n].items():
                    writer.bind_ortvalue_input(name, value)
        written = slots[real == 1]
        self.pool.positions[:, written] = positions[:, real == 1]
        self.pool.written[written] = True

    def reposition(self, slots: np.ndarray, positions: np.ndarray) -> int:
        """After an eviction: new positions for the kept tokens and the mask for freed slots, once per chunk.
        Every slot of the row is rotated from its pre-RoPE copy (a fixed shape; free slots rotate harmlessly)."""
        moved = int(self.pool.moved(slots, positions).sum())
        self.pool.positions[:, slots] = positions
        mask = self.past_mask()[None]
        self.mask.update_inplace(mask)
        self.host_bytes += mask.nbytes
        if moved:
            all_positions = np.concatenate([self.pool.positions, np.zeros((3, 1), np.int64)], axis=1)
            session, binding = self.rotate
            binding.bind_cpu_input("positions", all_positions)
            self.host_bytes += all_positions.nbytes
            session.run_with_iobinding(binding)
        return moved

    def past_mask(self) -> np.ndarray:
        """int64 [capacity + 1]: the pool's mask and the scratch slot's 0."""
        return np.concatenate([self.pool.past_mask(), [0]])

    def close(self) -> None:
        self.rows.detach(self.row)
