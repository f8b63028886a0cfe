"""The server's streams: one model, many commentators, taking turns chunk by chunk on one worker thread.

Each `Stream` owns its commentator (context and KV cache), its source (read in its own thread by a LiveEdge), its
pending questions, its subtitles on disk (VTT, SRT and JSON lines, written as the CLI writes them) and a log of
events (cues, answers, status changes, errors) that any number of listeners follow. The `Scheduler` runs every
model step on one thread: the sessions are shared, and ONNX Runtime already spreads one step over all cores, so
steps in parallel would only contend. Each pass over the streams gives every stream with a chunk ready exactly
one step, so no stream starves; a live stream whose turn comes late takes its newest chunk (the others are
dropped and counted, as in the CLI).
"""

import shutil
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .commentator import Commentator
from .live import Arrival, LiveEdge, Status
from .push import PushedFrames
from .subtitles import FORMATS, CueWriter, clean_text

HISTORY = 2000  # events a listener that connects late (or falls behind) can still catch up on
ACTIVE = ("starting", "running")


@dataclass
class Event:
    id: int
    # "cue", "answer", "status", "dropped" (chunks skipped), "conversation.item.created" (a question), "error"
    type: str
    data: dict


@dataclass
class Question:
    text: str
    asked: float  # media time when it was asked: the end of the last chunk commented


@dataclass
class Stream:
    id: str
    source: str  # redacted
    commentator: Commentator
    edge: LiveEdge
    folder: Path  # its subtitles (and an uploaded file)
    live: bool  # read at the live edge: cues carry lag and drops
    pushed: PushedFrames | None = None  # frames come from a client's socket
    state: str = "starting"
    error: str | None = None
    created: float = field(default_factory=time.time)
    questions: deque = field(default_factory=deque)
    cues: int = 0
    answers: int = 0
    dropped: int = 0
    frames_dropped: int = 0
    media_time: float = 0.0  # end of the last chunk commented
    cache_tokens: int = 0
    lags: deque = field(default_factory=lambda: deque(maxlen=60))
    seconds: dict = field(default_factory=dict)  # the last step's time per stage
    began: float | None = None  # perf_counter at the first chunk
    first_start: float = 0.0

    def __post_init__(self):
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=HISTORY)
        self._next_id = 0
        self._listeners: set[Callable[[], None]] = set()
        self.writers = {fmt: CueWriter(str(self.folder / f"commentary.{fmt}"), fmt) for fmt in FORMATS}

    # Events: appended from any thread; listeners are woken (an SSE response, a socket) and read `since`.
    def publish(self, type: str, data: dict) -> None:
        with self._lock:
            self._events.append(Event(self._next_id, type, data))
            self._next_id += 1
            listeners = list(self._listeners)
        for wake in listeners:
            wake()

    def since(self, first: int) -> list[Event]:
        with self._lock:
            return [e for e in self._events if e.id >= first]

    def listen(self, wake: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.add(wake)
        def unlisten():
            with self._lock:
                self._listeners.discard(wake)

        return unlisten

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE

    def ask(self, text: str) -> Question:
        question = Question(text, self.media_time)
        self.questions.append(question)
        self.publish("conversation.item.created", {"question": text, "asked": question.asked})
        return question

    def info(self) -> dict:
        """What GET /v1/streams/{id} says."""
        elapsed = time.perf_counter() - self.began if self.began is not None else 0.0
        lags = list(self.lags)
        return {"id": self.id, "source": self.source, "state": self.state, "error": self.error,
                "created": round(self.created, 3), "cues": self.cues, "answers": self.answers,
                "media_time": round(self.media_time, 3), "dropped": self.dropped,
                "frames_dropped": self.frames_dropped, "questions_pending": len(self.questions),
                "lag": round(lags[-1], 3) if lags else None,
                "lag_median": round(statistics.median(lags), 3) if lags else None,
                # media seconds commented per wall second since the first chunk (live sources: about 1)
                "real_time_factor": round((self.media_time - self.first_start) / elapsed, 3) if elapsed else None,
                "cache_tokens": self.cache_tokens, "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}

    # Run by the scheduler's thread only.
    def step(self) -> bool:
        """Take what the source has ready and handle it: a status event, or one chunk commented. False if there
        was nothing to do."""
        try:
            item = self.edge.take(0)
        except StopIteration:
            self.finish("ended")
            return False
        except Exception as error:  # a VideoError from the reader: the source cannot go on
            self.finish("failed", str(error))
            return False
        if item is None:
            return False
        if isinstance(item, Status):
            event = {"status": item.event, "source": item.source, **item.detail}
            self.writers["jsonl"].status(event)
            self.publish("status", event)
            return True
        try:
            self._comment(item)
        except Exception as error:  # e.g. CacheFull: this stream ends, the others go on
            self.finish("failed", str(error).splitlines()[0] if str(error) else type(error).__name__)
        return True

    def _comment(self, item: Arrival) -> None:
        if self.state == "starting":
            self._set_state("running")
            self.began, self.first_start = time.perf_counter(), item.chunk.start
        if item.dropped > self.dropped:  # chunks that completed while this stream was busy: say so at once
            self.publish("dropped", {"chunks": item.dropped - self.dropped, "dropped": item.dropped,
                                     "before": round(item.chunk.start, 3)})
            self.dropped = item.dropped
        question = self.questions.popleft() if self.questions else None
        reply = self.commentator.step(item.chunk, question.text if question else None)
        extra = {}
        if self.live:
            lag = time.monotonic() - item.arrived
            self.lags.append(lag)
            extra = {"lag": round(lag, 3), "dropped": item.dropped}
        for writer in self.writers.values():
            writer.write(reply.start, reply.end, reply.text, extra, question=question and question.text)
        self.media_time, self.cache_tokens, self.seconds = reply.end, reply.cache_tokens, reply.seconds
        cue = {"start": round(reply.start, 3), "end": round(reply.end, 3), "text": clean_text(reply.text), **extra}
        if question is None:
            self.cues += 1
            self.publish("cue", cue)
        else:
            self.answers += 1
            self.publish("answer", {**cue, "question": question.text, "asked": question.asked})

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state, self.error = state, error
        # "state" (the stream's) where a source's own status events say "status" (connected, reconnecting, ...)
        self.publish("status", {"state": state, **({"error": error} if error else {})})

    def finish(self, state: str, error: str | None = None) -> None:
        if self.finished:
            return
        self.edge.stop.set()
        self.commentator = None  # its context and KV cache go now; the subtitles stay on disk
        for writer in self.writers.values():
            writer.close()
        self._set_state(state, error)
        if error:
            self.publish("error", {"error": {"type": "stream_error", "message": error}})

    def remove_files(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Scheduler:
    """One worker thread that gives every active stream one step per pass."""

    def __init__(self):
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
            busy = False
            for stream in streams:
                busy |= stream.step()
            if not busy:
                self.wake.wait(0.2)

    def close(self) -> None:
        """Stop every stream and the worker; the files stay (the server removes a temporary data folder)."""
        for stream in self.all():
            self.stop(stream)
        self._closing.set()
        self.wake.set()
        self._thread.join(timeout=30)
