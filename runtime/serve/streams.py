"""The server's streams: each one a commentator, its source, its questions, its subtitles and its events.

Each `Stream` owns its commentator (context and KV cache), its source (read in its own thread by a LiveEdge), its
pending questions, its subtitles on disk (VTT, SRT and JSON lines, written as the CLI writes them) and a log of
events (cues, answers, status changes, errors) that any number of listeners follow. Its `step` is run by the
scheduler's thread only (scheduler.py).
"""

import shutil
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..commentator import Commentator, Decode
from ..live import LiveEdge, Status
from ..subtitles import FORMATS, CueWriter, clean_text
from .push import PushedFrames

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


def subtitle_writers(folder: Path) -> dict:
    """A stream's VTT, SRT and JSON lines files in `folder`, each written as the CLI writes it."""
    return {fmt: CueWriter(str(folder / f"commentary.{fmt}"), fmt) for fmt in FORMATS}


class EventLog:
    """A stream's events: appended from any thread; listeners (an SSE response, a socket) are woken and read
    `since` the last id they sent. The local `Stream` and a cluster replica's stream (runtime/cluster) both keep one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=HISTORY)
        self._next_id = 0
        self._listeners: set[Callable[[], None]] = set()

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


@dataclass
class Stream(EventLog):
    id: str
    source: str  # redacted
    commentator: Commentator
    edge: LiveEdge
    folder: Path  # its subtitles (and an uploaded file)
    live: bool  # read at the live edge: cues carry lag and drops
    pushed: PushedFrames | None = None  # frames come from a client's socket
    # where its subtitles go: VTT, SRT and JSON lines files in `folder` unless given (a cluster replica's streams
    # hand theirs to the process that serves the HTTP API)
    writers: dict | None = None
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
        EventLog.__init__(self)
        self.pending: Decode | None = None  # the next decode step of the chunk under way
        self._turn = self._item = self._question = None
        if self.writers is None:
            self.writers = subtitle_writers(self.folder)

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE

    async def push(self, payload: bytes) -> bool:
        """A frame from the client's socket (push.py): False if dropped; FrameError if it is not one."""
        return self.pushed.push(payload)

    def end_push(self) -> None:
        self.pushed.close()

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
        """Take what the source has ready and handle it: a status event, or one chunk commented with every decode
        step run alone (the unbatched scheduler). False if there was nothing to do."""
        if self.begin() is None:
            return False
        while self.pending is not None:
            self._advance(lambda: self._turn.send(self.pending.alone()), self._turn)
        return True

    def begin(self) -> str | None:
        """Take what the source has ready: "status" (a status event published) or "chunk" (its turn has started:
        frames encoded, prompt prefilled, and its first decode step waits in `pending`, or its cue is out already);
        None if there was nothing to do."""
        try:
            item = self.edge.take(0)
        except StopIteration:
            self.finish("ended")
            return None
        except Exception as error:  # a VideoError from the reader: the source cannot go on
            self.finish("failed", str(error))
            return None
        if item is None:
            return None
        if isinstance(item, Status):
            event = {"status": item.event, "source": item.source, **item.detail}
            self.writers["jsonl"].status(event)
            self.publish("status", event)
            return "status"
        if self.state == "starting":
            self._set_state("running")
            self.began, self.first_start = time.perf_counter(), item.chunk.start
        if item.dropped > self.dropped:  # chunks that completed while this stream was busy: say so at once
            self.publish("dropped", {"chunks": item.dropped - self.dropped, "dropped": item.dropped,
                                     "before": round(item.chunk.start, 3)})
            self.dropped = item.dropped
        self._item = item
        self._question = self.questions.popleft() if self.questions else None
        turn = self.commentator.turn(item.chunk, self._question.text if self._question else None)
        self._advance(lambda: next(turn), turn)
        return "chunk"

    def resume(self, logits) -> None:
        """The logits of the pending decode step: the turn goes on to its next step, or its cue goes out."""
        self._advance(lambda: self._turn.send(logits), self._turn)

    def _advance(self, move, turn) -> None:
        self._turn = turn
        try:
            try:
                self.pending = move()
            except StopIteration as done:
                self.pending = self._turn = None
                self._publish(done.value)
        except Exception as error:  # e.g. CacheFull, or a full disk: this stream ends, the others go on
            self.pending = self._turn = None
            self.finish("failed", str(error).splitlines()[0] if str(error) else type(error).__name__)

    def _publish(self, reply) -> None:
        item, question = self._item, self._question
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
        self.pending = self._turn = None
        if self.commentator is not None:
            self.commentator.close()  # its cache row is free for another stream
        self.commentator = None  # its context and KV cache go now; the subtitles stay on disk
        for writer in self.writers.values():
            writer.close()
        self._set_state(state, error)
        if error:
            self.publish("error", {"error": {"type": "stream_error", "message": error}})

    def remove_files(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
