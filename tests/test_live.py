"""Live sources on loopback: the live edge (bounded lag, counted drops), --realtime, stdin and pipe:N, timeouts,
reconnects after a stall, a close and a restarted clock (HTTP and TCP MPEG-TS), RTSP through GStreamer, SIGTERM.

Every server listens on 127.0.0.1 and stops by itself; every wait has a bound."""

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from live_servers import TsServer, remux, send_paced, ts_clip
from runtime import stream
from runtime.commentator import Commentator
from runtime.live import kind, redact
from runtime.sample import write_clip

SYSTEM_PYTHON = "/usr/bin/python3"


def cues_and_events(lines: list[str]) -> tuple[list[dict], list[dict]]:
    items = [json.loads(line) for line in lines if line.strip()]
    return [i for i in items if "start" in i], [i for i in items if "status" in i]


def test_source_kinds_and_redaction():
    assert [kind(s) for s in ("rtsp://cam/live", "HTTPS://x/a.m3u8", "tcp://h:1", "-", "pipe:3", "/dev/video0",
                              "match.mp4", "pipe:x")] == \
        ["network", "network", "network", "pipe", "pipe", "device", "file", "file"]
    assert redact("error: rtsp://admin:hunter2@cam.local:554/x and http://u@h/p, file a@b") == \
        "error: rtsp://***@cam.local:554/x and http://***@h/p, file a@b"


def _in_process(argv: list[str], monkeypatch, step_seconds: float | None = None) -> list[float]:
    """Run the CLI in this process (model loaded once per call), optionally with every step padded to
    `step_seconds`; returns the wall-clock time at which each cue was written."""
    written = []
    write = stream.CueWriter.write

    def timed_write(self, *args, **kwargs):
        written.append(time.monotonic())
        write(self, *args, **kwargs)

    monkeypatch.setattr(stream.CueWriter, "write", timed_write)
    if step_seconds is not None:
        step = Commentator.step

        # deterministic: a commentator that needs exactly step_seconds per chunk
        def slow_step(self, chunk, question=None):
            began = time.monotonic()
            reply = step(self, chunk, question)
            time.sleep(max(0.0, began + step_seconds - time.monotonic()))
            return reply

        monkeypatch.setattr(Commentator, "step", slow_step)
    assert stream.main(argv) == 0
    return written


def test_slow_commentator_keeps_a_bounded_lag_and_counts_every_drop(tiny_graphs, tmp_path, monkeypatch):
    """A file played live in 60 chunks of 0.25 s to a commentator that needs 0.5 s per chunk: it skips chunks
    instead of falling behind, each skip is counted, and the lag stays flat."""
    chunk, step = 0.25, 0.5
    clip = write_clip(tmp_path / "clip.mp4", 15, 128, 96, 10)
    out = tmp_path / "cues.jsonl"
    _in_process([str(clip), "--graphs", str(tiny_graphs), "--out", str(out), "--realtime", "--quiet",
                 "--chunk-duration", str(chunk), "--fps", "8", "--max-new-tokens", "4", "--seed", "1",
                 "--stats", str(tmp_path / "stats.jsonl")], monkeypatch, step)
    cues, _ = cues_and_events(out.read_text().splitlines())
    indices = [round(c["start"] / chunk) for c in cues]
    assert indices == sorted(set(indices)) and indices[-1] == 59  # media time kept; the last chunk is used
    assert [c["dropped"] for c in cues] == [index - k for k, index in enumerate(indices)]  # every skip counted
    assert 15 <= len(cues) <= 35, len(cues)  # about one chunk in two (one in three when a wait is needed)
    lags = [c["lag"] for c in cues]
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [s["dropped"] for s in stats] == [c["dropped"] for c in cues]
    # Steady state: a chunk waits for the step under way, then takes its own (each 2 chunks, or what the step
    # really took on a busy machine: the stages' measured seconds), plus up to a chunk for the decoding thread.
    # Without dropping, the lag would grow by one chunk per chunk, to about 15 s at the end.
    busy = [max(step, sum(s["seconds"][k] for k in ("preprocess", "vision", "prefill", "decode"))) for s in stats]
    for k in range(1, len(cues)):  # the first includes the sessions' first run
        assert lags[k] < busy[k - 1] + busy[k] + chunk, (k, lags, busy)
    assert sum(lags[-8:]) / 8 < sum(lags[1:9]) / 8 + chunk, lags
    assert {"decode_video", "wait", "vision"} <= set(stats[-1]["seconds"])


def test_realtime_file_follows_the_wall_clock(tiny_graphs, tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "clip.mp4", 4, 128, 96, 10)
    out = tmp_path / "cues.jsonl"
    written = _in_process([str(clip), "--graphs", str(tiny_graphs), "--out", str(out), "--realtime", "--quiet",
                           "--seed", "1"], monkeypatch)
    cues, _ = cues_and_events(out.read_text().splitlines())
    assert [(c["start"], c["end"], c["dropped"]) for c in cues] == [(k, k + 1, 0) for k in range(4)]
    # Each chunk completed (its cue's write time less its lag) one media second after the one before, on the wall
    # clock: the file is paced, not read ahead. Judged on arrivals, not on write times, so that a slow first step
    # (the sessions' first run) or a busy machine does not move the reference.
    arrived = [at - cue["lag"] for cue, at in zip(cues, written)]
    for cue, at in zip(cues, arrived):
        assert abs((at - arrived[0]) - (cue["end"] - cues[0]["end"])) < 0.3, (cues, written)


class Run:
    """`python -m runtime.stream ARGS` as a subprocess; stdout lines are kept with the time they arrived."""

    def __init__(self, *args: str, **popen):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.began = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "runtime.stream", *args], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
        self.lines: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.ready = threading.Event()  # the graphs are loaded; the source opens next
        self._readers = [threading.Thread(target=self._read, args=(self.process.stdout, False), daemon=True),
                         threading.Thread(target=self._read, args=(self.process.stderr, True), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe, errors: bool) -> None:
        for line in pipe:
            if errors:
                self.errors.append(line)
                self.ready.set()
            else:
                self.lines.append((time.monotonic(), line))

    def wait(self, timeout: float = 90) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.process.kill()
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.errors)

    def cues(self) -> tuple[list[dict], list[dict]]:
        return cues_and_events([line for _, line in self.lines])

    def cue_times(self) -> list[tuple[float, dict]]:
        return [(at, json.loads(line)) for at, line in self.lines if '"start"' in line]


def _stdin(run: Run):
    """What writes bytes to the run's stdin, and what closes it."""
    pipe = run.process.stdin.buffer
    return (lambda data: (pipe.write(data), pipe.flush())), run.process.stdin.close


def _feed(write, close, data: bytes, seconds: float) -> threading.Thread:
    def feed():
        try:
            send_paced(write, data, seconds)
            close()
        except OSError:  # the reader went away
            pass

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def _assert_follows_the_wall_clock(run: Run) -> None:
    # When each chunk completed (its cue's arrival less its lag): independent of how long the steps took, so a
    # busy machine moves nothing but the lag.
    timed = [(at - cue["lag"], cue) for at, cue in run.cue_times()]
    assert len(timed) >= 3, run.stderr
    first_at, first = timed[1]  # the first chunk also waits for the probe of the stream's start
    # The feed is paced by bytes, not by frames (a keyframe's bytes arrive late): hence a second of tolerance,
    # where reading as fast as possible would be off by the whole span of the feed.
    for at, cue in timed[1:]:
        assert -1.0 < (at - first_at) - (cue["end"] - first["end"]) < 1.5, timed


@pytest.mark.parametrize("how", ["stdin", "pipe:N"])
def test_stdin_and_pipe_descriptor_follow_the_live_feed(tiny_graphs, tmp_path, how):
    data = ts_clip(tmp_path / "feed.ts", 6)
    args = ["--graphs", str(tiny_graphs), "--out", "-", "--seed", "1"]
    if how == "stdin":
        run = Run("-", *args, stdin=subprocess.PIPE)
        write, close = _stdin(run)
    else:
        read_end, write_end = os.pipe()
        run = Run(f"pipe:{read_end}", *args, pass_fds=(read_end,))
        os.close(read_end)
        writer = os.fdopen(write_end, "wb", buffering=0)
        write, close = writer.write, writer.close
    assert run.ready.wait(60), "the CLI did not start"
    feeder = _feed(write, close, data, 6)  # paced once the model is loaded, as a live feed would be
    assert run.wait() == 0, run.stderr
    feeder.join(timeout=5)
    cues, events = run.cues()
    assert [e["status"] for e in events] == ["connected", "ended"]
    assert cues[0]["start"] == 0.0 and cues[-1]["end"] >= 5.0
    _assert_follows_the_wall_clock(run)


@pytest.mark.parametrize("http", [True, False], ids=["http", "tcp"])
def test_network_source_reconnects_after_stall_close_and_restart(tiny_graphs, tmp_path, http):
    """Three connections: half the clip then silence (a stall past --timeout), half then a close, the whole clip
    (each starting its clock from zero again), then the port closes. The run reconnects each time, re-anchors the
    clock so that cue times keep increasing, keeps every cue, and gives up after --reconnect attempts."""
    data = ts_clip(tmp_path / "feed.ts", 4)
    server = TsServer(data, 4, ["stall", "close", "full"], http=http)
    url = server.url("viewer:secret@" if http else "")
    run = Run(url, "--graphs", str(tiny_graphs), "--out", "-", "--timeout", "1", "--reconnect", "1", "--seed", "1")
    code = run.wait()
    server.join()
    cues, events = run.cues()
    assert code == 1 and run.stderr.splitlines()[-1].startswith("error: ") and "gave up" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert server.served == ["stall", "close", "full"]
    assert [e["status"] for e in events].count("connected") == 3
    assert "no data for 1 s" in [e.get("reason") for e in events]  # the stall
    starts = [c["start"] for c in cues]
    assert starts[0] == 0.0 and starts == sorted(set(starts)), starts  # nothing lost, always forward
    assert cues[-1]["end"] >= 5.0, cues  # media from all three connections, one after another
    output = run.stderr + "".join(line for _, line in run.lines)
    assert "secret" not in output and ("***@127.0.0.1" in output) == http


def test_a_source_that_sends_nothing_is_a_one_line_error_after_the_timeout(tiny_graphs, tmp_path):
    server = TsServer(b"", 1, ["silent"], limit=20)
    began = time.monotonic()
    run = Run(server.url(), "--graphs", str(tiny_graphs), "--out", str(tmp_path / "c.vtt"), "--timeout", "1",
              "--quiet")
    assert run.wait() == 1
    server.join()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no video frame arrived" in lines[0], lines
    assert time.monotonic() - began < 30


def test_sigterm_ends_a_live_run_keeping_its_cues(tiny_graphs, tmp_path):
    data = ts_clip(tmp_path / "feed.ts", 20)
    out = tmp_path / "live.vtt"
    run = Run("-", "--graphs", str(tiny_graphs), "--out", str(out), "--format", "jsonl", stdin=subprocess.PIPE)
    assert run.ready.wait(60)
    feeder = _feed(*_stdin(run), data, 20)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_text().count('"start"') >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 130 and "interrupted" in run.stderr, run.stderr
    feeder.join(timeout=25)
    cues, _ = cues_and_events(out.read_text().splitlines())
    assert len(cues) >= 2 and cues[0]["start"] == 0.0


def test_hls_recording_ends_normally_with_reconnect_zero(tiny_graphs, tmp_path):
    """An HLS playlist with EXT-X-ENDLIST, served by a plain HTTP server: read at the live edge (as fast as it
    downloads, so chunks are dropped and counted), and its end is a normal end with --reconnect 0."""
    clip = write_clip(tmp_path / "clip.mp4", 4, 128, 96, 10)
    folder = tmp_path / "hls"
    folder.mkdir()
    remux(clip, folder / "index.m3u8", "hls", {"hls_time": "1", "hls_list_size": "0", "hls_playlist_type": "vod"})
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run = Run(f"http://127.0.0.1:{server.server_address[1]}/index.m3u8", "--graphs", str(tiny_graphs),
                  "--out", "-", "--reconnect", "0", "--seed", "1")
        assert run.wait() == 0, run.stderr
    finally:
        server.shutdown()
        server.server_close()
    cues, events = run.cues()
    assert [e["status"] for e in events] == ["connected", "ended"]
    indices = [round(c["start"]) for c in cues]
    assert indices[-1] == 3 and [c["dropped"] for c in cues] == [i - k for k, i in enumerate(indices)]


def _gstreamer_rtsp() -> bool:
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert all(Gst.ElementFactory.find(e) for e in ('qtdemux', 'h264parse', 'rtph264pay'))")
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not os.environ.get("REQUIRE_RTSP") and not _gstreamer_rtsp(),
                    reason="needs GStreamer's RTSP server for /usr/bin/python3 (apt-get install python3-gi "
                    "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad; .ci/run does)")
def test_rtsp_camera(tiny_graphs, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 4, 128, 96, 10, codec="h264")
    server = subprocess.Popen([SYSTEM_PYTHON, str(Path(__file__).with_name("rtsp_server.py")), str(clip), "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()  # printed once it listens
        assert url.startswith("rtsp://127.0.0.1:"), server.stderr.read()
        run = Run(url.replace("rtsp://", "rtsp://viewer:secret@"), "--graphs", str(tiny_graphs), "--out", "-",
                  "--reconnect", "0", "--seed", "1")
        assert run.wait() == 0, run.stderr
    finally:
        server.kill()
        server.wait(timeout=10)
    cues, events = run.cues()
    assert [e["status"] for e in events] == ["connected", "ended"]
    assert len(cues) >= 3 and cues[0]["start"] == 0.0
    assert "secret" not in run.stderr + "".join(line for _, line in run.lines)
