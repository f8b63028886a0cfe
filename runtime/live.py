"""Live sources: network streams, pipes and cameras, read at the live edge.

A live source is opened with timeouts (no network read may block forever), read frame by frame over one
connection after another (a drop, a stall past the timeout or an unexpected end is reopened with backoff), and its
clock is re-anchored whenever timestamps jump backwards, so that the chunker in runtime/video.py sees one timeline
whose times keep increasing. `LiveEdge` runs all of that in its own thread and keeps only the newest complete chunk:
a commentator slower than real time skips chunks (counted) instead of falling further and further behind.
"""

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import av

from .video import (AV_ERRORS, Chunk, TimedFrame, VideoError, chunk_frames, decode_frames, error_text, paced,
                    rate_interval, read_chunks, video_stream)

NETWORK = re.compile(r"^(rtsps?|rtmps?|https?|tcp|udp|srt|rtp)://", re.IGNORECASE)
PIPE = re.compile(r"^pipe:(\d+)$")
BACKOFF = (1, 2, 4, 8, 16, 30)  # seconds before reconnect attempt 1, 2, ...; then 30 s each
# Small probes cut the open latency (RTSP 1.2 -> 0.6 s, a pipe 2.5 -> 0.5 s); one GOP of a small stream fits.
PROBE = {"probesize": "500000", "analyzeduration": "500000"}


def kind(source: str) -> str:
    """'network', 'pipe' (stdin is '-'), 'device' (v4l2) or 'file'."""
    if NETWORK.match(source):
        return "network"
    if source == "-" or PIPE.match(source):
        return "pipe"
    if source.startswith("/dev/video"):
        return "device"
    return "file"


def redact(text: str) -> str:
    """`text` with the user and password of every URL in it replaced by ***."""
    return re.sub(r"([a-z][a-z0-9+.-]*://)[^/\s@]+@", r"\1***@", text, flags=re.IGNORECASE)


@dataclass
class LiveConfig:
    timeout: float = 5.0  # seconds for an open and for each read of a network source
    reconnect: int | None = None  # reopen attempts after a failure (None: forever); files and pipes never
    realtime: bool = False  # pace frames by the wall clock (a file played as if live)


@dataclass
class Status:
    """A change of the source's state: said on stderr and written to JSON lines output."""
    event: str  # "connected", "disconnected", "reconnecting"
    source: str  # already redacted
    detail: dict = field(default_factory=dict)

    def line(self) -> str:
        extra = ", ".join(f"{key} {value}" for key, value in self.detail.items())
        return f"{self.event}: {self.source}" + (f" ({extra})" if extra else "")


def _open(source: str, where: str, timeout: float) -> av.container.InputContainer:
    options, fmt = dict(PROBE), None
    if source.lower().startswith("rtsp"):
        # FFmpeg's RTSP socket timeout is `timeout` in microseconds (the older `stimeout` is silently ignored);
        # TCP interleaving avoids the losses of UDP.
        options |= {"rtsp_transport": "tcp", "timeout": str(int(timeout * 1e6))}
    if where == "device":
        fmt = "v4l2"
    # A raw descriptor: a buffered Python file object added about 2 s of latency.
    url = "pipe:0" if source == "-" else source
    return av.open(url, format=fmt, options=options, timeout=(timeout, timeout))


def _why(error: Exception, timeout: float) -> str:
    if isinstance(error, av.error.ExitError):  # PyAV's timeout interrupts FFmpeg with "Immediate exit requested"
        return f"no data for {timeout:g} s"
    return error_text(error)


def live_frames(source: str, config: LiveConfig, on_status: Callable[[Status], None],
                stop: threading.Event) -> Iterator[TimedFrame]:
    """Timed frames of a live source over as many connections as it takes; the clock only moves forward."""
    where, name = kind(source), redact(source)
    retries = 0 if where == "pipe" else (math.inf if config.reconnect is None else config.reconnect)
    origin = None  # the first connection's clock start; later connections keep it unless they jump back
    offset, last, step = 0.0, -math.inf, 0.0
    attempt = 0
    while not stop.is_set():
        began, delivered, reason = time.monotonic(), False, "the stream ended"
        try:
            with _open(source, where, config.timeout) as container:
                stream = video_stream(container, name)
                if origin is None:
                    origin = container.start_time / av.time_base if container.start_time is not None else 0.0
                interval = rate_interval(stream)
                for frame in decode_frames(container, stream, origin, interval, name):
                    if not delivered:
                        delivered, attempt = True, 0
                        on_status(Status("connected", name, {"open_seconds": round(time.monotonic() - began, 2)}))
                    if frame.time + offset < last:  # a restarted or looped clock: continue after the last frame
                        offset = last + step - frame.time
                    frame.time += offset
                    last, step = frame.time, frame.duration or interval or 0.0
                    yield frame
                    if stop.is_set():
                        return
        except VideoError as error:  # from decode_frames or video_stream: the cause, if any, is the real reason
            reason = _why(error.__cause__, config.timeout) if error.__cause__ else str(error)
        except AV_ERRORS as error:  # InvalidDataError (RTSP), ExitError (a timeout), OSError (a closed socket)
            reason = _why(error, config.timeout)
        reason = redact(reason)
        if last == -math.inf:  # not a single frame yet: a wrong address or a source that is not sending
            raise VideoError(f"{name}: no video frame arrived ({reason}); "
                             "check the address and that the source is sending")
        if reason == "the stream ended" and retries == 0:
            on_status(Status("ended", name))
            return  # a finite live stream (a pipe, or --reconnect 0) that ends normally
        on_status(Status("disconnected", name, {"reason": reason}))
        attempt += 1
        if attempt > retries:
            what = "the stream broke" if retries == 0 else f"gave up after {retries} reconnect attempt(s)"
            raise VideoError(f"{name}: {what} ({reason})")
        wait = BACKOFF[min(attempt, len(BACKOFF)) - 1]
        on_status(Status("reconnecting", name, {"attempt": attempt, "wait_seconds": wait}))
        stop.wait(wait)


def live_chunks(source: str, config: LiveConfig, on_status: Callable[[Status], None], stop: threading.Event, *,
                resize: Callable[[int, int], tuple[int, int]], chunk_duration: float, frames_per_chunk: int,
                start: float, duration: float | None, min_side: int) -> Iterator[Chunk]:
    """The chunks of any source: a file through read_chunks (paced when realtime), else a live source."""
    if kind(source) == "file":
        yield from read_chunks(source, resize=resize, chunk_duration=chunk_duration,
                               frames_per_chunk=frames_per_chunk, start=start, duration=duration,
                               min_side=min_side, realtime=config.realtime)
        return
    frames = live_frames(source, config, on_status, stop)
    if config.realtime:
        frames = paced(frames, start)
    yield from chunk_frames(frames, redact(source), resize, chunk_duration, frames_per_chunk, start,
                            math.inf if duration is None else start + duration, min_side, None,
                            gap=outage(chunk_duration))


def outage(chunk_duration: float) -> float:
    """A picture older than two chunks (and 2 s) when the next frame arrives means an outage: leave a gap."""
    return max(2 * chunk_duration, 2.0)


@dataclass
class Arrival:
    chunk: Chunk
    arrived: float  # time.monotonic() when the chunk was complete
    dropped: int  # chunks replaced before they were used, up to now
    decode_seconds: float  # CPU time the reader thread spent since the previous chunk (decoding, converting)


class LiveEdge:
    """Reads `chunks` in a thread and hands out the newest complete one, with the status events met on the way.

    Iterating yields every Status in order and an Arrival whenever a chunk is ready; a chunk replaced before it
    was taken is dropped and counted. The reader's error (a VideoError) is raised where iteration reaches it.
    """

    def __init__(self, make_chunks: Callable[[Callable[[Status], None], threading.Event], Iterator[Chunk]],
                 keep_all: bool = False, notify: Callable[[], None] = lambda: None):
        """`keep_all`: the reader waits for each chunk to be taken instead of replacing it (a file read as fast as
        the consumer goes, nothing dropped); `notify` is called whenever something can be taken (a server's
        scheduler sleeps on it)."""
        self.stop = threading.Event()
        self._ready = threading.Condition()
        self._events: deque[Status] = deque()
        self._newest: Arrival | None = None
        self._dropped = 0
        self._done, self._error = False, None
        self._keep_all, self._notify = keep_all, notify
        self._chunks = make_chunks(self._status, self.stop)
        self._thread = threading.Thread(target=self._read, name="live-edge", daemon=True)
        self._thread.start()

    def _status(self, status: Status) -> None:
        with self._ready:
            self._events.append(status)
            self._ready.notify_all()
        self._notify()

    def _read(self) -> None:
        cpu = time.thread_time()
        try:
            for chunk in self._chunks:
                with self._ready:
                    while self._keep_all and self._newest is not None and not self.stop.is_set():
                        self._ready.wait(0.5)
                    if self._newest is not None:
                        self._dropped += 1
                    now = time.thread_time()
                    self._newest = Arrival(chunk, time.monotonic(), self._dropped, now - cpu)
                    cpu = now
                    self._ready.notify_all()
                self._notify()
                if self.stop.is_set():
                    break
        except Exception as error:  # handed to the consumer, which turns it into a one-line error
            self._error = error
        finally:
            with self._ready:
                self._done = True
                self._ready.notify_all()
            self._notify()

    def take(self, timeout: float) -> Status | Arrival | None:
        """The next status event, else the newest chunk, waiting up to `timeout` s; None if nothing came.
        Raises the reader's error, or StopIteration once the source has ended and everything was taken."""
        with self._ready:
            if not (self._events or self._newest or self._done):
                self._ready.wait(timeout)
            if self._events:
                return self._events.popleft()
            if self._newest is not None:
                item, self._newest = self._newest, None
                self._ready.notify_all()  # a keep_all reader may go on
                return item
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopIteration
            return None

    def __iter__(self) -> Iterator[Status | Arrival]:
        try:
            while True:
                try:
                    item = self.take(0.5)  # a bounded wait keeps Ctrl-C responsive on every platform
                except StopIteration:
                    return
                if item is not None:
                    yield item
        finally:
            self.stop.set()
