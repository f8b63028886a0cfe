"""The cluster's side of the HTTP process: `Cluster`, the backend runtime.serve's routes (serve/app.py) use here
instead of `Local`, and `Remote`, what they see of a stream that lives on a replica.

Routing: a stream lives on one replica for its whole life. The ingress opens it there (the alive replica with the
most room) and keeps the id -> replica map itself, so every request for the stream (events, questions, pushed
frames, stop) reaches that replica whatever Ray does with others; nothing depends on Ray's best-effort routing.

Events: one poller per replica (an asyncio task) long-polls it for every stream's new events and subtitle writes,
publishes the events into the stream's own log here (the SSE and WebSocket code of runtime.serve follows that log)
and replays the writes into the stream's VTT, SRT and JSON lines files here. A replica that dies takes its
streams' contexts and caches, never their subtitles.

Failure: a poll or call that fails asks the replica who it is; an answer from a new incarnation (Ray restarted the
actor) or no answer means its streams are lost: each gets a `status` (failed) and an `error` event, its sockets
close, and later requests for it get 410 Gone, but its subtitles stay downloadable and a stream whose source can be
opened again (a URL, a file on the replicas' machines, an upload) can be resumed on another replica. The poller
then waits for the replacement and puts it back in service.
"""

import argparse
import asyncio
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from ..live import kind as source_place
from ..live import redact
from ..serve.errors import Busy
from ..serve.options import source_kind
from ..serve.push import FrameError
from ..serve.streams import ACTIVE, EventLog, Question, subtitle_writers

FAILURES = (RayActorError, GetTimeoutError)  # ActorDiedError and ActorUnavailableError are RayActorErrors
POLL_TIMEOUT = 1.0  # seconds a poll waits for news on the replica


class ReplicaError(Exception):
    """A replica that cannot start (one line: why)."""


def cause(error: Exception) -> str:
    """The last line of a Ray error's text: the remote exception (Ray's text carries its whole traceback)."""
    lines = [line.strip() for line in str(getattr(error, "cause", None) or error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


@dataclass
class ReplicaState:
    name: str
    handle: object  # the Ray actor
    alive: bool = False
    incarnation: str | None = None
    max_streams: int = 0
    pid: int | None = None
    reserved: int = 0  # streams being opened on it
    batch: dict | None = None
    ready_at: float | None = None  # time.time() when it (or its replacement) was last ready
    lost: int = 0  # incarnations lost so far


class RemotePush:
    """What the socket code checks (`stream.pushed is not None`); the frames go to the replica."""


@dataclass(eq=False)
class Remote(EventLog):
    id: str
    source: str  # as given (the replica opens it again on resume); shown redacted
    options: dict  # runtime.stream's settings for it
    replica: ReplicaState
    folder: Path  # its subtitles, written here
    created: float = field(default_factory=time.time)
    state: str = "starting"
    error: str | None = None
    lost: str | None = None  # why requests get 410; None while it lives
    frames_dropped: int = 0  # counted by the socket code here
    snapshot: dict = field(default_factory=dict)  # the replica's last info() for it
    incarnation: str | None = None  # of the replica it was opened on: only that incarnation's loss loses it
    cursor: int = 0  # the replica's next event id
    written: int = 0  # the number of the replica's next subtitle write
    resuming: bool = False
    offset: float = 0.0  # added to media times after a resume from a live source (its times restart at 0)
    last_end: float = 0.0  # where its last cue ended (media time): a resume goes on from there
    asked: int = 0  # questions sent that the replica has not yet said it received

    def __post_init__(self):
        EventLog.__init__(self)
        self.pushed = RemotePush() if source_kind(self.source) == "push" else None
        self.writers = subtitle_writers(self.folder)

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE

    @property
    def media_time(self) -> float:
        return self.last_end

    @property
    def questions(self) -> range:  # its length is what the routes check
        return range(self.snapshot.get("questions_pending", 0) + self.asked)

    def info(self) -> dict:
        return {**self.snapshot, "id": self.id, "source": redact(self.source), "state": self.state,
                "error": self.error, "created": round(self.created, 3), "media_time": round(self.media_time, 3),
                "frames_dropped": self.frames_dropped, "replica": self.replica.name}

    def ask(self, text: str) -> Question:
        self.asked += 1
        self.replica.handle.ask.remote(self.id, text)  # in order with this stream's other calls
        return Question(text, self.media_time)

    async def push(self, payload: bytes) -> bool:
        try:
            queued, error = await self.replica.handle.push.remote(self.id, payload)
        except FAILURES:
            raise FrameError("the stream's replica is not answering (lost?)") from None
        if error is not None:
            raise FrameError(error)
        return queued

    def end_push(self) -> None:
        self.replica.handle.end_push.remote(self.id)

    # Applied by the poller, on the event loop.
    def apply(self, news: dict) -> None:
        self.snapshot = news["info"]
        self.written += len(news["writes"])
        for method, args, kwargs in news["writes"]:
            if method == "write":
                start, end, *rest = args
                for writer in self.writers.values():
                    writer.write(start + self.offset, end + self.offset, *rest, **kwargs)
                self.last_end = end + self.offset
            elif method == "status":
                self.writers["jsonl"].status(*args)
            else:  # "close": the stream ended on its replica
                self.close_files()
        for id, type, data in news["events"]:
            self.cursor = id + 1
            if type in ("cue", "answer") and self.offset:
                data = {**data, "start": round(data["start"] + self.offset, 3),
                        "end": round(data["end"] + self.offset, 3)}
            if type == "status" and "state" in data:
                self.state, self.error = data["state"], data.get("error")
            if type == "conversation.item.created":
                self.asked = max(0, self.asked - 1)
            self.publish(type, data)

    def lose(self, why: str) -> None:
        if self.finished:
            return
        resume = f"; POST /v1/streams/{self.id}/resume goes on on another replica" if self.resumable else ""
        self.lost = f"stream {self.id} was lost with its replica: {why}{resume}"
        self.state, self.error = "failed", self.lost
        self.publish("status", {"state": "failed", "error": self.lost})
        self.publish("error", {"error": {"type": "replica_lost", "message": self.lost}})
        if not self.resumable:  # a resumable stream's files stay open: its subtitles go on after a resume
            self.close_files()

    @property
    def resumable(self) -> bool:
        return source_kind(self.source) not in ("push", "device", "pipe")

    def close_files(self) -> None:
        for writer in self.writers.values():
            writer.close()


class Cluster:
    def __init__(self, replicas: list[ReplicaState]):
        self.replicas = replicas
        self.streams: dict[str, Remote] = {}
        self._lock = threading.Lock()  # routes run `open` on worker threads
        self._pollers: list[asyncio.Task] = []

    # Start-up and the pollers (on the event loop).
    async def start(self, timeout: float) -> None:
        """Wait for every replica (at most `timeout` s); a replica whose start fails says why, in one line."""
        try:
            await asyncio.wait_for(asyncio.gather(*(self._ready(r, starting=True) for r in self.replicas)), timeout)
        except TimeoutError:
            raise ReplicaError(f"the replicas were not ready after {timeout:g} s (Ray could not place them, or "
                               "loading the graphs takes longer: --start-timeout)") from None
        self._pollers = [asyncio.create_task(self._poll(r)) for r in self.replicas]

    async def _ready(self, replica: ReplicaState, starting: bool = False) -> None:
        """Wait until the replica answers (a replacement loads the model first)."""
        while True:
            try:
                hello = await replica.handle.hello.remote()
                break
            except ActorDiedError as error:  # its constructor failed: Ray will not restart it
                if starting:
                    raise ReplicaError(f"replica {replica.name} did not start: {cause(error)}") from None
                print(f"replica {replica.name} cannot be replaced: {cause(error)}", file=sys.stderr, flush=True)
                await asyncio.sleep(30)
            except FAILURES:
                await asyncio.sleep(0.5)
        if hello["incarnation"] == replica.incarnation:  # a false alarm: the streams marked lost still run there
            for stream in self.all():
                if stream.replica is replica and stream.incarnation == replica.incarnation and stream.lost:
                    replica.handle.delete.remote(stream.id)
        replica.incarnation, replica.max_streams, replica.pid = hello["incarnation"], hello["max_streams"], hello["pid"]
        replica.alive, replica.ready_at = True, time.time()
        print(f"replica {replica.name} ready (pid {hello['pid']}, {hello['provider']}, GPUs {hello['gpus']}, at most "
              f"{replica.max_streams} stream(s))", file=sys.stderr, flush=True)

    async def _poll(self, replica: ReplicaState) -> None:
        while True:
            mine = {s.id: s for s in self.all() if s.replica is replica and s.incarnation == replica.incarnation
                    and not s.lost and not s.resuming}
            cursors = {id: (s.cursor, s.written) for id, s in mine.items()}
            try:
                news = await replica.handle.poll.remote(cursors, POLL_TIMEOUT)
            except FAILURES as error:
                await self._check(replica, error)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug must not stop the poller: say it, go on
                print(f"cluster: poll of {replica.name}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                await asyncio.sleep(POLL_TIMEOUT)
                continue
            if news["incarnation"] != replica.incarnation:
                self._lose(replica, "it was restarted")
                await self._ready(replica)
                continue
            replica.batch = news.get("batch")
            for id, item in news["streams"].items():
                stream = mine[id]
                if stream.lost or self.streams.get(id) is not stream:  # lost or deleted meanwhile
                    continue
                try:
                    stream.apply(item)
                except Exception as error:  # e.g. a full disk: this stream ends here, the others go on
                    stream.lose(f"its events could not be applied here ({type(error).__name__}: {error})")
                    replica.handle.delete.remote(id)

    async def _check(self, replica: ReplicaState, error: Exception) -> None:
        """A failed poll: the same replica (a passing fault) goes on; a new one or none means its streams are lost."""
        try:
            hello = await asyncio.wait_for(replica.handle.hello.remote(), 2.0)
            if hello["incarnation"] == replica.incarnation:
                return
        except (asyncio.TimeoutError, *FAILURES):
            pass
        self._lose(replica, f"{type(error).__name__}")
        await self._ready(replica)

    def _lose(self, replica: ReplicaState, why: str) -> None:
        """The streams of the replica's current incarnation are lost (a stream opened on its replacement is not)."""
        replica.alive = False
        replica.lost += 1
        print(f"replica {replica.name} lost ({why}); its streams end, Ray replaces it", file=sys.stderr, flush=True)
        for stream in self.all():
            if stream.replica is replica and stream.incarnation == replica.incarnation:
                stream.lose(f"replica {replica.name} ({why})")

    # What the routes ask of a backend (serve/local.py has the same methods).
    def full(self, pending: int = 0) -> str | None:
        """`pending`: streams the routes are opening; they are the replicas' reservations, counted once."""
        alive = [r for r in self.replicas if r.alive]
        room = sum(r.max_streams - self._active(r) for r in alive) - max(pending, sum(r.reserved for r in alive))
        if room <= 0:
            return (f"the cluster is busy: {len(alive)} of {len(self.replicas)} replica(s) in service, every one full "
                    "(--max-streams per replica); delete a stream or try later")
        return None

    def _active(self, replica: ReplicaState) -> int:
        return sum(1 for s in list(self.streams.values()) if s.replica is replica and not s.finished)

    def _room(self, replica: ReplicaState) -> int:
        return replica.max_streams - self._active(replica) - replica.reserved

    def _choose(self) -> ReplicaState:
        with self._lock:
            alive = [r for r in self.replicas if r.alive and self._room(r) > 0]
            if not alive:
                raise Busy(self.full() or "the cluster is busy")
            replica = max(alive, key=self._room)  # the most room; ties: the first
            replica.reserved += 1
            return replica

    def open(self, id: str, args, source: str, folder: Path, stream: Remote | None = None) -> Remote:
        """Open the stream on the replica with the most room (blocking: run off the event loop). `stream`: a lost
        one to resume there."""
        options = vars(args).copy()
        upload = Path(options["video"]).read_bytes() if source_kind(source) == "upload" else None
        replica = self._choose()
        try:
            opened = ray.get(replica.handle.open.remote(id, options, source, upload))
        except RayTaskError as error:  # the replica could not open it (e.g. a path its node does not have)
            raise ValueError(f"replica {replica.name} could not open the stream: {cause(error)}") from None
        except FAILURES as error:
            raise Busy(f"replica {replica.name} failed while opening the stream ({type(error).__name__}); "
                       "try again") from None
        finally:
            with self._lock:
                replica.reserved -= 1
        with self._lock:
            if stream is None:
                stream = Remote(id, source, options, replica, folder)
            elif self.streams.get(id) is not stream:  # deleted while it was being resumed
                replica.handle.delete.remote(id)
                raise LookupError(f"stream {id} was deleted")
            stream.replica, stream.incarnation, stream.snapshot = replica, opened["incarnation"], opened["info"]
            stream.cursor, stream.written, stream.lost, stream.state, stream.error = 0, 0, None, "starting", None
            self.streams[id] = stream
        return stream

    async def resume(self, stream: Remote) -> None:
        if not stream.lost or stream.resuming:
            raise LookupError(f"stream {stream.id} is {'resuming' if stream.resuming else stream.state}; only a "
                              "stream lost with its replica resumes")
        if not stream.resumable:
            raise LookupError(f"stream {stream.id} reads {source_kind(stream.source)!r}, which cannot be opened "
                              "again; start a new stream")
        args = argparse.Namespace(**stream.options)
        first = args.start or 0.0
        end = first + args.duration if args.duration is not None else None
        if source_place(args.video) == "file":  # read again from where its subtitles stopped (file times)
            offset, args.start = 0.0, max(first, stream.media_time)
            left = end - args.start if end is not None else None
        else:  # a live source starts at its live edge, its times from 0: they go on from the last cue
            offset = stream.media_time
            left = args.duration - stream.media_time if args.duration is not None else None
        if left is not None and left <= 0:
            raise LookupError(f"stream {stream.id} had commented all of its --duration")
        args.duration = left
        stream.resuming = True
        try:
            await asyncio.get_running_loop().run_in_executor(None, lambda: self.open(stream.id, args, stream.source,
                                                                                     stream.folder, stream))
        finally:
            stream.resuming = False
        stream.offset = offset
        stream.publish("status", {"status": "resumed", "replica": stream.replica.name})

    def get(self, id: str) -> Remote | None:
        return self.streams.get(id)

    def all(self) -> list[Remote]:
        with self._lock:
            return list(self.streams.values())

    def active(self) -> int:
        return sum(not s.finished for s in self.all())

    def stop(self, stream: Remote) -> None:
        stream.replica.handle.stop.remote(stream.id)

    def delete(self, id: str) -> None:
        with self._lock:
            stream = self.streams.pop(id, None)
        if stream is None:
            return
        if not stream.lost:
            stream.replica.handle.delete.remote(id)
        stream.close_files()
        shutil.rmtree(stream.folder, ignore_errors=True)

    def counters(self) -> dict:
        batch = {"decode_calls": 0, "rows_decoded": 0}
        for replica in self.replicas:
            for key in batch:
                batch[key] += (replica.batch or {}).get(key, 0)
        replicas = [{"name": r.name, "alive": r.alive, "pid": r.pid, "max_streams": r.max_streams,
                     "streams": self._active(r),
                     "ready_at": r.ready_at, "lost": r.lost} for r in self.replicas]
        return {"batch": batch, "replicas": replicas}

    def close(self) -> None:
        for task in self._pollers:
            task.cancel()
        for stream in self.all():
            stream.close_files()
