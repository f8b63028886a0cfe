"""runtime.video on real files written here with PyAV: frame choice by time, chunk bounds, and every error."""

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from runtime.sample import synthetic_frame, write_clip
from runtime.video import VideoError, read_chunks

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 48, 64
MS = Fraction(1, 1000)


def keep_size(height: int, width: int) -> tuple[int, int]:
    return height, width


def gray(level: int, height: int = HEIGHT, width: int = WIDTH) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(np.full((height, width, 3), level, np.uint8), format="rgb24")


def write_gray(path: Path, times: list[float], lead: bool = False) -> Path:
    """Frame i is solid gray 5*i shown from times[i] s, FFV1 in RGB (lossless: levels survive exactly).

    `lead` adds a second, tiny video stream with one frame at 0 s, so that the file's clock starts before
    the first frame of the main stream (as when audio starts first).
    """
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt, stream.time_base = WIDTH, HEIGHT, "bgr0", MS
        if lead:
            other = container.add_stream("ffv1", rate=10)
            other.width, other.height, other.pix_fmt, other.time_base = 16, 16, "bgr0", MS
            frame = gray(0, 16, 16)
            frame.pts, frame.time_base = 0, MS
            container.mux(other.encode(frame) + other.encode())
        for index, time in enumerate(times):
            frame = gray(5 * index)
            frame.pts, frame.time_base = round(time * 1000), MS
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def indices(chunk) -> list[int]:
    """Which frames of a write_gray file a chunk holds, after checking each is intact and solid."""
    levels = chunk.frames[:, 0, 0, 0]
    assert np.array_equal(chunk.frames, np.broadcast_to(levels[:, None, None, None], chunk.frames.shape))
    return [int(level) // 5 for level in levels]


def expected_indices(times: list[float], targets: list[float]) -> list[int]:
    # The latest frame shown at each target; the first one for targets before it.
    return [max(int(np.searchsorted(times, target, side="right")) - 1, 0) for target in targets]


def test_constant_rate_with_partial_last_chunk(tmp_path):
    path = write_gray(tmp_path / "cfr.mkv", [i / 10 for i in range(26)])  # 2.6 s at 10 fps
    chunks = list(read_chunks(path, resize=keep_size))
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.start for c in chunks] == [0.0, 1.0, 2.0]
    assert [c.end for c in chunks] == pytest.approx([1.0, 2.0, 2.6])
    # Targets 0.25, 0.75, ... 2.75 s; 2.75 is past the end, so the last chunk repeats its frame at 2.25 s.
    assert [indices(c) for c in chunks] == [[2, 7], [12, 17], [22, 22]]
    assert all(c.frames.shape == (2, HEIGHT, WIDTH, 3) and c.frames.dtype == np.uint8 for c in chunks)


def test_variable_rate_is_chosen_by_time(tmp_path):
    times = [0.4, 0.5, 0.9, 0.95, 1.0, 1.8, 2.4, 2.45, 2.9]  # last frame shown until 3.0 s
    path = write_gray(tmp_path / "vfr.mkv", times, lead=True)
    chunks = list(read_chunks(path, resize=keep_size))
    targets = [k + (j + 0.5) / 2 for k in range(3) for j in range(2)]
    assert [i for c in chunks for i in indices(c)] == expected_indices(times, targets) == [0, 1, 4, 4, 5, 7]
    assert [c.end for c in chunks] == pytest.approx([1.0, 2.0, 3.0])

    quarter = list(read_chunks(path, resize=keep_size, frames_per_chunk=4))
    targets = [k + (j + 0.5) / 4 for k in range(3) for j in range(4)]
    assert [i for c in quarter for i in indices(c)] == expected_indices(times, targets)


def test_start_and_duration(tmp_path):
    path = write_gray(tmp_path / "cfr.mkv", [i / 10 for i in range(26)])
    chunks = list(read_chunks(path, resize=keep_size, start=1.0, duration=1.5))
    assert [(c.index, c.start) for c in chunks] == [(0, 1.0), (1, 2.0)]
    assert [c.end for c in chunks] == pytest.approx([2.0, 2.5])  # the duration ends the stream like an end of file
    assert [indices(c) for c in chunks] == [[12, 17], [22, 22]]

    offset = list(read_chunks(path, resize=keep_size, start=0.5, chunk_duration=0.5, duration=1.0))
    assert [indices(c) for c in offset] == [[6, 8], [11, 13]]


def test_resize_is_asked_once_with_the_source_size(tmp_path):
    path = write_gray(tmp_path / "cfr.mkv", [i / 10 for i in range(15)])
    calls = []

    def resize(height, width):
        calls.append((height, width))
        return 32, 96

    chunks = list(read_chunks(path, resize=resize))
    assert calls == [(HEIGHT, WIDTH)]
    assert [c.frames.shape for c in chunks] == [(2, 32, 96, 3)] * 2


def test_write_clip_round_trips_losslessly(tmp_path):
    path = write_clip(tmp_path / "clip.mkv", 2, WIDTH, HEIGHT, 10, codec="ffv1", pix_fmt="bgr0")
    chunks = list(read_chunks(path, resize=keep_size))
    got = np.concatenate([c.frames for c in chunks])
    assert np.array_equal(got, np.stack([synthetic_frame(i, WIDTH, HEIGHT, 10) for i in (2, 7, 12, 17)]))


def test_sample_cli_writes_a_readable_clip(tmp_path):
    out = tmp_path / "nested" / "clip.mp4"
    run = subprocess.run([sys.executable, "-m", "runtime.sample", str(out), "--seconds", "2", "--size", "64x48",
                          "--fps", "10"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    chunks = list(read_chunks(out, resize=lambda h, w: (32, 64)))
    assert [(c.start, c.end) for c in chunks] == [(0.0, 1.0), (1.0, 2.0)]
    assert chunks[0].frames.shape == (2, 32, 64, 3)
    assert not np.array_equal(chunks[0].frames, chunks[1].frames)  # the content moves


def test_raw_stream_without_timestamps(tmp_path):
    # A raw H.264 stream carries no presentation times: frames are placed one duration after another.
    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height = WIDTH, HEIGHT
        for index in range(25):
            container.mux(stream.encode(gray(5 * index)))
        container.mux(stream.encode())
    chunks = list(read_chunks(path, resize=keep_size))
    assert [c.end for c in chunks] == pytest.approx([1.0, 2.0, 2.5])
    levels = np.array([c.frames[:, 0, 0, 0] for c in chunks], dtype=float) / 5  # lossy: levels are near
    assert np.allclose(levels, [[2, 7], [12, 17], [22, 22]], atol=0.5)


def expect_error(path, *words, **kwargs) -> str:
    with pytest.raises(VideoError) as caught:
        list(read_chunks(path, resize=keep_size, **kwargs))
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.mp4", "no such file")


def test_text_file_is_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n" * 50)
    expect_error(path, "not a readable video")


def test_truncated_file(tmp_path):
    whole = write_clip(tmp_path / "whole.mp4", 2, WIDTH, HEIGHT, 10).read_bytes()
    path = tmp_path / "half.mp4"
    path.write_bytes(whole[: len(whole) // 2])  # MP4 keeps its index at the end: the cut loses it
    expect_error(path, "not a readable video")


def test_damage_mid_stream_keeps_earlier_chunks(tmp_path):
    path = write_gray(tmp_path / "cfr.mkv", [i / 10 for i in range(40)])
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    chunks = read_chunks(path, resize=keep_size)
    assert indices(next(chunks)) == [2, 7]
    with pytest.raises(VideoError, match="damaged"):
        list(chunks)


def test_audio_only(tmp_path):
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        tone = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32) * 0.3
        for offset in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, offset: offset + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, offset
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    expect_error(path, "no video stream")


def test_zero_frames(tmp_path):
    # AVI keeps a video stream header with no frames (MP4 and Matroska drop or refuse such a file).
    path = tmp_path / "empty.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "bgr0"
        container.start_encoding()
    expect_error(path, "no video frame")


def test_frames_below_min_side(tmp_path):
    path = write_clip(tmp_path / "tiny.mkv", 1, 8, 8, 10, codec="ffv1", pix_fmt="bgr0")
    expect_error(path, "8x8", "16", min_side=16)
    assert len(list(read_chunks(path, resize=keep_size, min_side=8))) == 1
