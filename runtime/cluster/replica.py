"""One engine replica: a Ray actor that loads the graphs once and serves streams exactly as runtime.serve does (its
`Local` backend: one model, the scheduler, batching), minus HTTP. The cluster's HTTP process (ingress.py) calls it
to open, question, feed, stop and delete streams, and polls it for their events and subtitle writes: a stream's
subtitles are written by the ingress, so a replica's death does not take them.

Calls run in order on one thread (open, ask, push, ...), except `poll`, which waits for news on a thread of its own.
"""

import argparse
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import ray

from .. import stream as cli
from ..manifest import Manifest
from ..serve.local import Local
from ..serve.push import FrameError
from ..serve.startup import measured_max_streams


class Recorder:
    """A stream's subtitle writes (CueWriter's calls), numbered and kept until the ingress acknowledges them (it
    replays them into its files): given to the stream as its only writer."""

    def __init__(self):
        self._calls: list = []
        self._first = 0  # the number of self._calls[0]
        self._lock = threading.Lock()

    def write(self, *args, **kwargs) -> None:
        self._record("write", args, kwargs)

    def status(self, event: dict) -> None:
        self._record("status", (event,), {})

    def close(self) -> None:
        self._record("close", (), {})

    def _record(self, method: str, args: tuple, kwargs: dict) -> None:
        with self._lock:
            self._calls.append((method, args, kwargs))

    def since(self, first: int) -> list:
        """The writes from number `first` on; the ones before it were applied by the ingress and are dropped."""
        with self._lock:
            del self._calls[:max(0, first - self._first)]
            self._first = max(self._first, first)
            return list(self._calls)


class Replica:
    def __init__(self, options: dict, name: str):
        """`options`: runtime.serve's parsed command line, as a dict (the graphs path is the same on every node)."""
        args = argparse.Namespace(**options)
        manifest = Manifest.load(cli.find_graphs(args.graphs))
        providers, provider_options = cli.session_setup(args)
        from ..model import Model

        model = Model(manifest, providers, args.threads, provider_options)
        self.max_streams = args.max_streams or measured_max_streams(model, manifest, args)
        self.local = Local(args, manifest, model, self.max_streams)
        self.name, self.provider = name, providers[0]
        self.incarnation = uuid.uuid4().hex  # a replacement is a new replica: the ingress tells them apart by this
        self.folder = Path(tempfile.mkdtemp(prefix="qwen3vl-replica-"))  # uploads shipped here
        self._recorders: dict[str, Recorder] = {}
        self._news = threading.Condition()

    @ray.method(concurrency_group="hello")  # never queued behind a slow open: the ingress's liveness check
    def hello(self) -> dict:
        return {"name": self.name, "incarnation": self.incarnation, "max_streams": self.max_streams,
                "pid": os.getpid(), "provider": self.provider, "gpus": ray.get_gpu_ids()}

    def open(self, id: str, options: dict, source: str, upload: bytes | None) -> dict:
        args = argparse.Namespace(**options)
        folder = self.folder / id
        folder.mkdir()
        if upload is not None:
            (folder / "upload").write_bytes(upload)
            args.video = str(folder / "upload")
        recorder = Recorder()
        stream = self.local.open(id, args, source, folder, {"jsonl": recorder})
        self._recorders[id] = recorder
        stream.listen(self._wake)
        return {"info": stream.info(), "incarnation": self.incarnation}

    def _wake(self) -> None:
        with self._news:
            self._news.notify_all()

    @ray.method(concurrency_group="poll")
    def poll(self, cursors: dict[str, tuple[int, int]], timeout: float = 1.0) -> dict:
        """For each stream the ingress asks about, with its cursors (the next event id and the next write number it
        expects): its events and subtitle writes from there on and its state; waits up to `timeout` for news."""
        streams = [(s, *cursors[s.id]) for s in self.local.all() if s.id in cursors]

        def news() -> bool:
            return any(s.since(events) for s, events, _ in streams)

        with self._news:
            self._news.wait_for(news, timeout)
        out = {}
        for stream, events, writes in streams:
            recorder = self._recorders.get(stream.id)
            out[stream.id] = {"events": [(e.id, e.type, e.data) for e in stream.since(events)],
                              "writes": recorder.since(writes) if recorder else [], "info": stream.info()}
        return {"incarnation": self.incarnation, "streams": out, **self.local.counters()}

    def ask(self, id: str, text: str) -> None:
        stream = self.local.get(id)
        if stream is not None and not stream.finished:
            stream.ask(text)

    def push(self, id: str, payload: bytes) -> tuple[bool, str | None]:
        """(queued, None), (False, None) if dropped, or (False, why) for a frame that is not one."""
        stream = self.local.get(id)
        if stream is None or stream.pushed is None:
            return False, "no such pushed stream on this replica"
        try:
            return stream.pushed.push(payload), None
        except FrameError as error:
            return False, str(error)

    def end_push(self, id: str) -> None:
        stream = self.local.get(id)
        if stream is not None and stream.pushed is not None:
            stream.end_push()

    def stop(self, id: str) -> None:
        stream = self.local.get(id)
        if stream is not None:
            self.local.stop(stream)

    def delete(self, id: str) -> None:
        self.local.delete(id)  # the scheduler removes the stream's folder (here: only an upload)
        self._recorders.pop(id, None)

    def close(self) -> None:
        self.local.close()
        shutil.rmtree(self.folder, ignore_errors=True)
