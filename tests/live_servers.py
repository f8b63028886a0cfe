"""Loopback servers for the live-source tests: MPEG-TS over raw TCP or HTTP, following a script of connections.

Each connection plays one step of the script, paced at the clip's real rate so that the client sees a live stream:
"full" sends the whole clip and closes, "close" sends its first half and closes, "stall" sends its first half and
then holds the connection silent until the client gives up, "silent" sends nothing. After the script the port is
closed (connection refused). Every wait is bounded, and the server thread ends by itself.
"""

import socket
import threading
import time

import av

from runtime.sample import write_clip

HTTP_HEADER = b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nConnection: close\r\n\r\n"


def remux(clip, path, fmt: str, options: dict | None = None) -> None:
    """The video of `clip` copied, not re-encoded, into `path` in container format `fmt` (mpegts, hls, ...)."""
    with av.open(str(clip)) as source, av.open(str(path), "w", format=fmt, options=options or {}) as out:
        video = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:  # the demuxer's final empty packet
                packet.stream = video
                out.mux(packet)


def ts_clip(path, seconds: float, width: int = 128, height: int = 96, fps: int = 10):
    """An H.264 (or MPEG-4) clip remuxed to MPEG-TS, the container of live feeds; returns its bytes."""
    remux(write_clip(path.with_suffix(".mp4"), seconds, width, height, fps), path, "mpegts")
    return path.read_bytes()


def send_paced(write, data: bytes, seconds: float, stop: threading.Event | None = None) -> None:
    """`data` in tenths of `seconds`, one tenth every 0.1 s of wall clock."""
    piece = max(1, len(data) // max(1, round(seconds * 10)))
    began = time.monotonic()
    for k, offset in enumerate(range(0, len(data), piece)):
        if stop is not None and stop.is_set():
            return
        time.sleep(max(0.0, began + 0.1 * k - time.monotonic()))
        write(data[offset:offset + piece])


class TsServer:
    """Serves `data` (an MPEG-TS clip of `seconds`) on 127.0.0.1 following `script`; `url` is what to open."""

    def __init__(self, data: bytes, seconds: float, script: list[str], http: bool = False, limit: float = 60.0):
        self.data, self.seconds, self.script, self.http = data, seconds, list(script), http
        self.deadline = time.monotonic() + limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.served: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, userinfo: str = "") -> str:
        scheme = "http" if self.http else "tcp"
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}/live.ts"

    def _serve(self) -> None:
        try:
            while self.script and time.monotonic() < self.deadline:
                try:
                    connection, _ = self.listener.accept()
                except TimeoutError:
                    continue
                step = self.script.pop(0)
                with connection:
                    self._play(connection, step)
                self.served.append(step)
        finally:
            self.listener.close()

    def _play(self, connection: socket.socket, step: str) -> None:
        connection.settimeout(max(0.1, self.deadline - time.monotonic()))
        try:
            if self.http:
                request = b""
                while b"\r\n\r\n" not in request:
                    received = connection.recv(4096)
                    if not received:
                        return
                    request += received
                connection.sendall(HTTP_HEADER)
            half = len(self.data) // 2
            if step == "full":
                send_paced(connection.sendall, self.data, self.seconds)
            elif step in ("close", "stall"):
                send_paced(connection.sendall, self.data[:half], self.seconds / 2)
            if step in ("stall", "silent"):
                while connection.recv(4096):  # held open, silent, until the client hangs up
                    pass
        except OSError:  # the client went away
            pass

    def join(self) -> None:
        self.thread.join(timeout=max(0.0, self.deadline - time.monotonic()) + 1)
