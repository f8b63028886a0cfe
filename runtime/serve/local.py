"""The streams of this process: one model, one scheduler. What the HTTP routes (app.py) ask of a backend: open a
stream, find, list, stop and delete streams, say whether there is room. runtime.serve serves a `Local`; each
replica of runtime.cluster runs one, and the cluster's HTTP process a `Cluster` with the same methods over them.
"""

import math
from pathlib import Path

from .. import stream as cli
from ..batch import Batch
from ..commentator import Commentator
from ..live import LiveEdge, outage, redact
from ..manifest import Manifest
from ..video import chunk_frames
from .options import batch_sizes, source_kind
from .push import PushedFrames
from .scheduler import Scheduler
from .streams import Stream


class Local:
    def __init__(self, args, manifest: Manifest, model, max_streams: int):
        self.args, self.manifest, self.model, self.max_streams = args, manifest, model, max_streams
        batch = None if not args.batch else Batch(model, bool(args.static), batch_sizes(args), max_streams)
        self.scheduler = Scheduler(batch)

    def full(self, pending: int = 0) -> str | None:
        """Why a new stream would be refused now (503), with `pending` streams being opened, or None."""
        if self.scheduler.active() + pending >= self.max_streams:
            return f"the server is busy: {self.max_streams} stream(s) at once (--max-streams); delete one or try later"
        return None

    def open(self, id: str, args, source: str, folder: Path, writers: dict | None = None) -> Stream:
        """Start a stream of `source` with the settings in `args` (runtime.stream's, checked by the caller);
        blocking (the tokenizer loads from disk). `folder` holds its subtitles, unless `writers` take them."""
        commentator = Commentator(self.model, cli.config_from(args, questions=True), self.scheduler.batch)
        pushed = PushedFrames() if source_kind(source) == "push" else None
        stream = Stream(id, redact(source), commentator, self._edge(args, pushed), folder,
                        pushed is not None or cli.is_live(args), pushed, writers)
        self.scheduler.add(stream)
        return stream

    def _edge(self, args, pushed: PushedFrames | None) -> LiveEdge:
        """The stream's source, read in its own thread; it wakes the scheduler whenever a chunk is ready."""
        notify = self.scheduler.wake.set
        if pushed is None:  # a file is read as fast as the turns allow, every chunk, unless realtime
            return cli.live_edge(args, self.manifest, keep_all=not cli.is_live(args), notify=notify)
        chunking = cli.chunking(args, self.manifest)  # frames come over the socket, at the live edge
        return LiveEdge(lambda on_status, stop: chunk_frames(
            pushed.frames(stop), "push", chunking["resize"], args.chunk_duration, chunking["frames_per_chunk"], 0.0,
            math.inf, chunking["min_side"], None, gap=outage(args.chunk_duration)), notify=notify)

    # Finding and ending streams.
    def get(self, id: str) -> Stream | None:
        return self.scheduler.get(id)

    def all(self) -> list[Stream]:
        return self.scheduler.all()

    def active(self) -> int:
        return self.scheduler.active()

    def stop(self, stream: Stream) -> None:
        self.scheduler.stop(stream)

    def delete(self, id: str) -> None:
        self.scheduler.delete(id)

    def counters(self) -> dict:
        """What GET /v1/streams adds: batched decode calls so far and the rows they served (mean batch size)."""
        batch = self.scheduler.batch
        return {"batch": {"decode_calls": batch.steps, "rows_decoded": batch.rows_decoded} if batch else None}

    async def resume(self, stream: Stream) -> None:
        raise LookupError("only a stream whose cluster replica was lost can be resumed (python -m runtime.cluster)")

    def close(self) -> None:
        self.scheduler.close()
