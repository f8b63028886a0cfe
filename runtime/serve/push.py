"""Frames pushed by a client (a browser's webcam over a WebSocket): JPEG images with their capture times.

A pushed frame is 8 bytes of capture time (float64, little-endian, seconds on any clock that only moves forward)
followed by one JPEG image. `push` decodes it at once, so that a bad frame is refused to the client that sent it,
and queues it for the chunker (runtime/video.py's chunk_frames) that reads `frames` in the stream's live-edge
thread. Times count from the first frame. A frame that finds the queue full is dropped: the client pushes faster
than the stream's frames are turned into chunks.
"""

import math
import queue
import struct
import threading
import time
from collections.abc import Iterator

import av

from ..video import AV_ERRORS, TimedFrame, error_text

HEADER = struct.Struct("<d")
JPEG_START = b"\xff\xd8"
MAX_PIXELS = 3840 * 2160  # a 4K frame: more is no webcam
MAX_JUMP = 3600  # seconds between two pushed frames: more is a broken clock, not a pause


class FrameError(ValueError):
    """A pushed frame that cannot be used; the message is one line for the client."""


class PushedFrames:
    def __init__(self, backlog: int = 8, first_frame_wait: float = 30.0):
        # A stream whose client never sends a frame (a page closed before its socket opened) ends after
        # first_frame_wait seconds instead of holding its place (--max-streams) forever.
        self.first_frame_wait = first_frame_wait
        self._queue: queue.Queue[TimedFrame | None] = queue.Queue(backlog)
        self._decoder = av.CodecContext.create("mjpeg", "r")
        self._origin: float | None = None
        self._last = -math.inf
        self._closed = threading.Event()

    def push(self, payload: bytes) -> bool:
        """Queue one frame; False if it was dropped (queue full). Raises FrameError for a frame that is not one."""
        if len(payload) <= HEADER.size or payload[HEADER.size:HEADER.size + 2] != JPEG_START:
            raise FrameError("a frame is 8 bytes of capture time (float64, little-endian, seconds) and a JPEG image")
        (captured,) = HEADER.unpack_from(payload)
        if not math.isfinite(captured):
            raise FrameError("the frame's capture time is not a number")
        try:
            frames = self._decoder.decode(av.Packet(payload[HEADER.size:]))
        except AV_ERRORS as error:
            raise FrameError(f"the frame is not a readable JPEG image ({error_text(error)})") from None
        if not frames:
            raise FrameError("the frame is not a readable JPEG image")
        if frames[-1].width * frames[-1].height > MAX_PIXELS:  # a small JPEG can declare a huge picture
            raise FrameError(f"the frame is {frames[-1].width}x{frames[-1].height}; at most {MAX_PIXELS} pixels")
        if self._origin is None:
            self._origin = captured
        time = captured - self._origin
        if time <= self._last:
            raise FrameError(f"capture times must increase ({time:.3f} s after {self._last:.3f} s)")
        if time > max(self._last, 0) + MAX_JUMP:
            raise FrameError(f"the capture time jumps {time - max(self._last, 0):.0f} s ahead; at most {MAX_JUMP} s")
        try:
            self._queue.put_nowait(TimedFrame(time, None, frames[-1]))
        except queue.Full:
            return False
        self._last = time
        return True

    def close(self) -> None:
        """No more frames: the chunker finishes the last chunk and the stream ends."""
        self._closed.set()

    def frames(self, stop: threading.Event) -> Iterator[TimedFrame]:
        deadline = time.monotonic() + self.first_frame_wait
        while not stop.is_set():
            try:
                yield self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._closed.is_set() or (self._origin is None and time.monotonic() > deadline):
                    return
