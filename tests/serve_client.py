"""A commentary server for the tests (`python -m runtime.serve`, or `python -m runtime.cluster`, on 127.0.0.1, a free
port) and small clients of its API. Every wait has a bound; the server is stopped with SIGTERM (killed if it does not stop) when the block ends."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction

import aiohttp
import av
import numpy as np

from conftest import ROOT
from runtime.serve.push import HEADER


# A local Ray cluster for the tests: two replicas, one core each, a small object store, no dashboard.
CLUSTER = ("--replicas", "2", "--ray-cpus", "2", "--threads", "1", "--object-store-mb", "100")


class Server:
    def __init__(self, graphs, *args: str, data_dir=None, timeout: float = 90, module: str = "runtime.serve"):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        extra = ["--data-dir", str(data_dir)] if data_dir else []
        self.process = subprocess.Popen([sys.executable, "-m", module, "--graphs", str(graphs), "--port",
                                         "0", *extra, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        started = threading.Event()

        def read():
            for line in self.process.stderr:
                self.log.append(line)
                if line.startswith("serving "):
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise AssertionError(f"the server did not start: {''.join(self.log)}")
        # the line that says where it listens (a warning may be printed after it on a slow machine)
        self.url = next(re.search(r"serving (http://\S+?)/? ", line).group(1) for line in list(self.log)
                        if line.startswith("serving "))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.process.kill()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run(coroutine, limit: float = 120):
    """Run an async test body with a bound on its whole duration."""
    return asyncio.run(asyncio.wait_for(coroutine, limit))


async def sse(session: aiohttp.ClientSession, url: str, until=lambda events: False, limit: float = 60,
              **kwargs) -> list[tuple[str, dict]]:
    """(event type, data) of a server-sent event stream until it ends, `until(events)` is true, or `limit` s."""
    events, kind, data = [], None, []
    deadline = time.monotonic() + limit
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=limit), **kwargs) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        while time.monotonic() < deadline:
            line = await response.content.readline()
            if not line:
                break
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line and kind:
                events.append((kind, json.loads("\n".join(data))))
                kind, data = None, []
                if until(events):
                    break
    return events


def jpeg(rgb: np.ndarray) -> bytes:
    """One JPEG image of an RGB frame (what a browser's canvas.toBlob gives)."""
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "yuvj420p"
    codec.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])


def pushed_frame(captured: float, image: bytes) -> bytes:
    return HEADER.pack(captured) + image


async def create(session, server: Server, source: str, **settings) -> dict:
    async with session.post(f"{server.url}/v1/streams", json={"source": source, **settings}) as response:
        body = await response.json()
        assert response.status == 201, body
        return body
