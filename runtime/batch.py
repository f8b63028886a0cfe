"""Many streams, one decoder call: the decode steps of every stream that is decoding run as one batched step.

Each stream keeps its own engine (slot pool, positions, eviction, re-rotation: runtime/engine.py) over a row of a
cache shared by the batch: `HostRows` on the host path, `DeviceRows` on the static path (one per cache capacity,
since a static session serves one capacity). A batched step runs the single-token decoder once over a run of
consecutive rows, bound or sliced as a view (no cache is copied), with the rows that are not decoding now left
out by their masks; then each stream keeps its row's new K/V in its own slot. Rows are handed out lowest first,
so the streams being served sit together at the start of the cache.

The decoder graph already takes B rows (`inputs_embeds [B, S, H]`, `past_mask [B, past]`, ...). The static path
compiles the decoder for a few batch sizes (`buckets`) and pads a run up to the next one.
"""

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from .commentator import Decode
from .engine import DeviceRows, HostRows
from .model import Model

BUCKETS = (1, 2, 4, 8)


class Batch:
    def __init__(self, model: Model, static: bool = False, buckets: Sequence[int] = BUCKETS, streams: int = 8):
        """`buckets`: the batch sizes the static path compiles the decoder for; `streams`: how many streams will be
        served at once (the static path allocates cache rows in blocks of the bucket that covers that many, at most
        the largest bucket; a block is allocated when the last one is full)."""
        self.model, self.static = model, static
        if not static:
            model.prepack("decoder")  # its calls are of many rows now (see Model.prepack)
        self.buckets = sorted(set(buckets))
        if not self.buckets or self.buckets[0] != 1:
            raise ValueError("the batch sizes must include 1")
        self.block = next((b for b in self.buckets if b >= streams), self.buckets[-1])
        self._host: HostRows | None = None
        self._device: dict[int, list[DeviceRows]] = {}  # capacity -> blocks of rows
        self._calls: dict = {}  # (capacity, bucket) -> the static decoder's session, binding and buffers
        self.steps = 0  # batched calls made
        self.rows_decoded = 0  # rows they served (their mean is the batch size)

    def host_rows(self, capacity: int) -> HostRows:
        if self._host is None:
            self._host = HostRows(self.model, capacity, rows=0)
        self._host.fit(capacity)
        return self._host

    def device_rows(self, capacity: int) -> DeviceRows:
        """A block of device rows of this capacity with a row free (streams batch with those of their block)."""
        blocks = self._device.setdefault(capacity, [])
        free = [b for b in blocks if not all(b.taken)]
        if not free:
            self._release()
            blocks = self._device.setdefault(capacity, [])
            blocks.append(DeviceRows(self.model, capacity, self.block))
            free = blocks[-1:]
        return free[0]

    def _release(self) -> None:
        """Free the device memory of blocks no stream uses (capacities follow streams' settings: without this,
        streams of ever new sizes would leave their caches behind)."""
        for capacity, blocks in list(self._device.items()):
            self._device[capacity] = [b for b in blocks if any(b.taken)]
            if not self._device[capacity]:
                del self._device[capacity]
                self._calls = {key: call for key, call in self._calls.items() if key[0] != capacity}

    def decode(self, steps: list[Decode]) -> list[np.ndarray]:
        """Run every stream's next decode step (one per stream); the logits [V] of each, in order."""
        logits: list[np.ndarray | None] = [None] * len(steps)
        groups: dict[int, list[int]] = {}
        for k, step in enumerate(steps):
            groups.setdefault(id(step.engine.rows), []).append(k)
        for members in groups.values():
            members.sort(key=lambda k: steps[k].engine.row)
            limit = self.buckets[-1] if self.static else len(members)
            for run in runs([steps[k].engine.row for k in members], limit):
                picked = members[:len(run)]
                members = members[len(run):]
                run_steps = [steps[k] for k in picked]
                out = self._static(run_steps) if self.static else self._host_run(run_steps)
                self.steps += 1
                self.rows_decoded += len(run_steps)
                for k, row_logits in zip(picked, out):
                    logits[k] = row_logits
        return logits

    def _inputs(self, steps: list[Decode], lo: int, batch: int, slots: int):
        """The decoder's inputs for rows [lo, lo + batch): the steps' rows filled in, the others empty."""
        model = self.model
        embeds = np.zeros((batch, 1, model.hidden), model.float_dtype)
        positions = np.zeros((3, batch, 1), np.int64)
        mask = np.zeros((batch, slots), np.int64)
        for step in steps:
            j = step.engine.row - lo
            embeds[j] = step.embeds
            positions[:, j] = step.positions
            own = step.engine.past_mask()
            mask[j, :len(own)] = own
        deepstack = np.zeros((model.n_deepstack, batch, 1, model.hidden), model.float_dtype)
        return embeds, deepstack, positions, mask, np.ones((batch, 1), np.int64)

    def _host_run(self, steps: list[Decode]) -> list[np.ndarray]:
        rows = steps[0].engine.rows
        rows.fit(max(step.engine.pool.capacity for step in steps))  # a pool that grew for this token
        lo, hi = steps[0].engine.row, steps[-1].engine.row + 1
        feeds = self._inputs(steps, lo, hi - lo, rows.capacity)
        out = self.model.step(*feeds, [k[lo:hi] for k in rows.keys], [v[lo:hi] for v in rows.values], "decoder")
        for step in steps:
            step.engine.store(out, step.engine.row - lo, step.positions, step.slots)
        return [out.logits[step.engine.row - lo] for step in steps]

    def _static(self, steps: list[Decode]) -> list[np.ndarray]:
        rows: DeviceRows = steps[0].engine.rows
        first, last = steps[0].engine.row, steps[-1].engine.row
        bucket = next(b for b in self.buckets if b >= last - first + 1)
        lo = min(first, len(rows.taken) - bucket)  # a run near the end pads at its front
        if lo < 0:
            raise ValueError(f"batch bucket {bucket} exceeds the {len(rows.taken)} cache rows")
        session, binding, new, logits = self._bound(rows, bucket)
        for i in range(self.model.layers):
            rows.bind(binding, f"past_key.{i}", f"key.{i}", lo, bucket)
            rows.bind(binding, f"past_value.{i}", f"value.{i}", lo, bucket)
        names = ("inputs_embeds", "deepstack_embeds", "position_ids", "past_mask", "new_mask")
        for name, array in zip(names, self._inputs(steps, lo, bucket, rows.slots)):
            binding.bind_cpu_input(name, array)
        session.run_with_iobinding(binding)
        out = logits.numpy().copy()  # [bucket, V]; the buffer is overwritten by the next step
        for step in steps:
            step.engine.write(1, step.positions, step.slots, np.ones(1, np.int64), new, step.engine.row - lo)
        return [out[step.engine.row - lo] for step in steps]

    def _bound(self, rows: DeviceRows, bucket: int):
        key = (rows.capacity, bucket)
        if key not in self._calls:
            model = self.model
            session = model.session("decoder", {"batch": bucket, "past": rows.slots, "new": 1})
            binding = session.io_binding()
            new = rows.new_buffers(1, bucket)
            for name, value in new.items():
                binding.bind_ortvalue_output(name, value)
            vocab = model.manifest["text"]["vocab_size"]
            logits = ort.OrtValue.ortvalue_from_shape_and_type([bucket, vocab], np.float32, "cpu", 0)
            binding.bind_ortvalue_output("logits", logits)
            self._calls[key] = (session, binding, new, logits)
        return self._calls[key]


def runs(rows: list[int], limit: int) -> list[list[int]]:
    """Split sorted row numbers into runs that each span at most `limit` rows and waste (span less members) no
    more rows than they serve."""
    out: list[list[int]] = []
    for row in rows:
        if out:
            span = row - out[-1][0] + 1
            if span <= limit and span - len(out[-1]) - 1 <= len(out[-1]) + 1:
                out[-1].append(row)
                continue
        out.append([row])
    return out


def together(batch: Batch, turns: list) -> list:
    """Drive started-and-not-yet-advanced chunk turns (Commentator.turn generators) to their ends, their decode
    steps batched: each turn's Reply, in order."""
    replies, pending = [None] * len(turns), {}
    for k, turn in enumerate(turns):
        try:
            pending[k] = next(turn)
        except StopIteration as done:
            replies[k] = done.value
    while pending:
        order = list(pending)
        for k, logits in zip(order, batch.decode([pending[k] for k in order])):
            try:
                pending[k] = turns[k].send(logits)
            except StopIteration as done:
                replies[k] = done.value
                del pending[k]
    return replies
