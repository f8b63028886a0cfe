"""The server's turns: one model, many streams, every model call on one worker thread.

The `Scheduler` runs every model step on one thread: the sessions are shared, and ONNX Runtime already spreads one
step over all cores, so steps in parallel would only contend. A live stream whose turn comes late takes its newest
chunk (the others are dropped and counted, as in the CLI).

Batched (`--batch`, the default; runtime/batch.py), each pass is continuous batching: first one decoder call for
every stream that is decoding (all their next tokens at once, whatever chunk each is on), then one stream with a
chunk ready starts it (vision and prefill, alone: measured, a prefill of B rows costs about B prefills, README
"Batching") and joins the decode batch from the next pass; a reply that ends leaves it. Decodes first, as vLLM
schedules them: a pass then delays the decoding streams by at most one prefill, and the streams waiting for a
prefill are taken round robin, so none starves and none waits for the slowest reply of a batch.

Unbatched (--no-batch), each pass gives every stream with a chunk ready its whole chunk, decode steps one at a time.
"""

import sys
import threading

from ..batch import Batch
from .streams import Stream


class Scheduler:
    """One worker thread that serves the active streams, batched or one chunk at a time."""

    def __init__(self, batch: Batch | None = None):
        self.batch = batch
        self._last: str | None = None  # the stream that started a chunk last (round robin)
        self.streams: dict[str, Stream] = {}  # every stream not yet deleted, finished ones too (their files stay)
        self._lock = threading.Lock()
        self._retiring: list[Stream] = []
        self._stopping: list[Stream] = []
        self.wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def active(self) -> int:
        with self._lock:
            return sum(not s.finished for s in self.streams.values())

    def add(self, stream: Stream) -> None:
        with self._lock:
            self.streams[stream.id] = stream
        self.wake.set()

    def get(self, id: str) -> Stream | None:
        with self._lock:
            return self.streams.get(id)

    def all(self) -> list[Stream]:
        with self._lock:
            return list(self.streams.values())

    def stop(self, stream: Stream) -> None:
        """End the stream before its next pass; its subtitles stay until it is deleted."""
        with self._lock:
            self._stopping.append(stream)
        stream.edge.stop.set()
        self.wake.set()

    def delete(self, id: str) -> Stream | None:
        """Forget the stream; the worker ends it before its next pass and removes its files."""
        with self._lock:
            stream = self.streams.pop(id, None)
            if stream is not None:
                self._retiring.append(stream)
        if stream is not None:
            stream.edge.stop.set()
            self.wake.set()
        return stream

    def _retire(self) -> None:
        """Stopped and deleted streams end here, on the worker's thread, between two steps."""
        with self._lock:
            stopping, self._stopping = self._stopping, []
            retiring, self._retiring = self._retiring, []
        for stream in stopping:
            stream.finish("stopped")
        for stream in retiring:
            stream.finish("deleted")
            stream.remove_files()

    def _run(self) -> None:
        while True:
            self.wake.clear()
            self._retire()
            if self._closing.is_set():
                return
            with self._lock:
                streams = [s for s in self.streams.values() if not s.finished]
            try:
                busy = self._batched(streams) if self.batch is not None else self._alone(streams)
            except Exception as error:  # a bug must not stop every stream: say it, wait, go on
                print(f"scheduler: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                busy = False
            if not busy:
                self.wake.wait(0.2)

    @staticmethod
    def _alone(streams: list[Stream]) -> bool:
        busy = False
        for stream in streams:
            busy |= stream.step()
        return busy

    def _batched(self, streams: list[Stream]) -> bool:
        decoding = [s for s in streams if s.pending is not None]
        if decoding:
            try:
                logits = self.batch.decode([s.pending for s in decoding])
            except Exception as error:  # not one stream's fault: the streams in the call end, the others go on
                for stream in decoding:
                    stream.finish("failed", f"batched decode step: {str(error).splitlines()[0] if str(error) else ''}")
            else:
                for stream, row in zip(decoding, logits):
                    stream.resume(row)
        busy = bool(decoding)
        ids = [s.id for s in streams]  # creation order; the round robin goes on after the last stream started
        after = ids.index(self._last) if self._last in ids else -1
        for k in range(1, len(streams) + 1):
            stream = streams[(after + k) % len(streams)]
            if stream.pending is not None or stream.finished:
                continue
            began = stream.begin()
            busy |= began is not None
            if began == "chunk":  # one prefill per pass; status events cost nothing and are all handled
                self._last = stream.id
                break
        return busy

    def close(self) -> None:
        """Stop every stream and the worker; the files stay (the server removes a temporary data folder)."""
        for stream in self.all():
            self.stop(stream)
        self._closing.set()
        self.wake.set()
        self._thread.join(timeout=30)
