"""Video input: decode a file lazily into fixed-length chunks of frames picked by presentation time.

Chunk k covers [start + k*d, start + (k+1)*d). Its n frames sample the chunk at t_j = chunk_start + (j + 0.5) d/n,
each taking the latest frame shown at t_j (its presentation time <= t_j), so variable frame rates and dropped
frames are handled by time, never by counting frames. Only the current and the next decoded frame are held.
Live sources (runtime/live.py) feed the same chunker with frames from one connection after another.
"""

import math
import time as wall
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

# PyAV's errors do not derive from OSError; file-system errors (missing file, permissions) do.
AV_ERRORS = (av.error.FFmpegError, OSError)


class VideoError(Exception):
    """A video that cannot be read; the message is one line saying what is wrong and what to do."""


@dataclass
class Chunk:
    index: int
    start: float  # seconds of video time
    end: float  # start + chunk duration, or the video's end for a final partial chunk
    frames: np.ndarray  # uint8 [n, h, w, 3] RGB at the target size


@dataclass
class TimedFrame:
    time: float  # seconds from the stream's start
    duration: float | None  # seconds, when the container says
    frame: av.VideoFrame


def error_text(error: Exception) -> str:
    return (getattr(error, "strerror", None) or str(error)).replace("\n", " ")


def decode_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream, origin: float,
                  frame_interval: float | None, path: str | Path) -> Iterator[TimedFrame]:
    """Decoded frames with their times; a decoding error becomes a VideoError where the stream breaks."""
    time = 0.0
    expected = 0.0  # where a frame without a timestamp goes (raw .h264 streams have none): after the last one
    try:
        for frame in container.decode(stream):
            duration = float(frame.duration * frame.time_base) if frame.duration else None
            time = expected if frame.time is None else frame.time - origin
            expected = time + (duration or frame_interval or 0.0)
            yield TimedFrame(time, duration, frame)
    except AV_ERRORS as error:
        raise VideoError(f"{path}: the video data is damaged after {time:.1f} s ({error_text(error)}); "
                         "re-encode the file, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4") from error


def rate_interval(stream: av.video.stream.VideoStream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(1 / rate) if rate else None


def video_stream(container: av.container.InputContainer, path: str | Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoError(f"{path}: has no video stream (audio only?); pass a file that contains video")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def paced(frames: Iterator[TimedFrame], start: float) -> Iterator[TimedFrame]:
    """`frames` released no earlier than their time after `start` on the wall clock: a file played as if live."""
    began = wall.monotonic()
    for frame in frames:
        wall.sleep(max(0.0, began + frame.time - start - wall.monotonic()))
        yield frame


def read_chunks(path: str | Path, *, resize: Callable[[int, int], tuple[int, int]], chunk_duration: float = 1.0,
                frames_per_chunk: int = 2, start: float = 0.0, duration: float | None = None,
                min_side: int = 16, realtime: bool = False) -> Iterator[Chunk]:
    """Yield the chunks of `path` from `start` for `duration` seconds (to the end when None).

    `resize(height, width)` is called once with the first frame's size and returns the target (height, width)
    every frame is converted to (bicubic). Errors, including those met mid-stream, raise VideoError when
    iteration reaches them; chunks already yielded stay valid. `realtime` paces the frames by the wall clock.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file; check the path")
    try:
        container = av.open(str(path))
    except AV_ERRORS as error:
        raise VideoError(f"{path}: not a readable video, or a truncated one ({error_text(error)}); "
                         "pass a complete video file such as .mp4, .mkv or .webm") from error
    with container:
        stream = video_stream(container, path)
        # Times count from the file's first timestamp (MPEG-TS, for one, starts its clock near 1.4 s), as a
        # player's timeline does; a video stream that starts after the audio keeps its offset.
        origin = container.start_time / av.time_base if container.start_time is not None else 0.0
        if start > 0:
            try:  # lands on the keyframe at or before `start`; frames before it are skipped by time below
                container.seek(int((start + origin) / stream.time_base), stream=stream)
            except AV_ERRORS as error:
                raise VideoError(f"{path}: cannot seek to {start:.1f} s ({error_text(error)}); "
                                 "re-encode the file or start at 0") from error
        interval = rate_interval(stream)
        frames = decode_frames(container, stream, origin, interval, path)
        yield from chunk_frames(paced(frames, start) if realtime else frames, path, resize, chunk_duration,
                                frames_per_chunk, start, math.inf if duration is None else start + duration,
                                min_side, interval)


def chunk_frames(frames: Iterator[TimedFrame], path: str | Path, resize: Callable[[int, int], tuple[int, int]],
                 chunk_duration: float, frames_per_chunk: int, start: float, stop: float, min_side: int,
                 frame_interval: float | None, gap: float = math.inf) -> Iterator[Chunk]:
    """The chunks of timed `frames`. A chunk in which no frame arrives while the one on screen is older than
    `gap` seconds is skipped (live sources: an outage is a gap in the cues, not seconds of a frozen picture)."""
    current = next(frames, None)
    if current is None:
        raise VideoError(f"{path}: no video frame could be decoded; the file is empty or damaged, re-encode it")
    width, height = current.frame.width, current.frame.height
    if min(width, height) < min_side:
        raise VideoError(f"{path}: frames are {width}x{height}, smaller than the minimum of {min_side} pixels "
                         "per side; use a larger video")
    target_height, target_width = resize(height, width)
    upcoming = next(frames, None)

    def end_of_video(last: TimedFrame) -> float:
        # The last frame is shown for its own duration, else one frame interval, else (a lone frame of
        # unknown rate) one sampling step so that it still makes a chunk.
        step = last.duration or frame_interval or chunk_duration / frames_per_chunk
        return min(last.time + step, stop)

    def rgb(item: TimedFrame) -> np.ndarray:
        return item.frame.reformat(width=target_width, height=target_height, format="rgb24",
                                   interpolation="BICUBIC").to_ndarray()

    index = -1
    while True:
        index += 1
        chunk_start = start + index * chunk_duration
        chunk_end = chunk_start + chunk_duration
        if upcoming is not None and upcoming.time >= chunk_end and chunk_start - current.time > gap:
            index = max(index, int((upcoming.time - start) // chunk_duration) - 1)  # over the whole gap at once
            continue
        picked: list[np.ndarray] = []
        for j in range(frames_per_chunk):
            target = chunk_start + (j + 0.5) * chunk_duration / frames_per_chunk
            while upcoming is not None and upcoming.time <= target:
                current, upcoming = upcoming, next(frames, None)
            if target >= (end_of_video(current) if upcoming is None else stop):
                if not picked:
                    return  # the whole chunk lies past the end
                picked.append(picked[-1])  # a final partial chunk repeats its last frame
            else:
                picked.append(rgb(current))
        # Look ahead to this chunk's end (the next target lies beyond it) to learn whether the video ends inside.
        while upcoming is not None and upcoming.time < chunk_end:
            current, upcoming = upcoming, next(frames, None)
        end = min(chunk_end, end_of_video(current) if upcoming is None else stop)
        yield Chunk(index, chunk_start, end, np.stack(picked))
