"""python -m runtime.serve [--graphs graphs/NAME] [--host 127.0.0.1] [--port 8000] [--token T] [--max-streams N]

A commentary server: the graphs are loaded once, streams are started over HTTP by other programs (or by the page
at /), every stream has its own StreamingVLM context and cache, and they take turns chunk by chunk. Cues, answers
and status changes go out as server-sent events and over a WebSocket, which also takes a browser's webcam frames
and questions. The API is described in the README.

Modules, one job each:
- options.py: the command line, the source kinds clients may open, and the per-stream settings and limits;
- startup.py: loading the model, measuring how many streams it serves, binding and running the app, `main`;
- app.py: the aiohttp application: middlewares (errors, same origin, token) and the REST routes;
- events.py: following a stream's events over server-sent events and the WebSocket (questions, pushed frames);
- errors.py: an HTTP error as one JSON line, a socket's error event;
- streams.py: a stream (its commentator, source, questions, subtitles and event log);
- local.py: the streams of this process, the backend behind the routes (runtime.cluster has another);
- scheduler.py: the one worker thread on which the streams take turns on the model;
- push.py: frames pushed by a browser (JPEG images with their capture times);
- web/index.html: the page.
"""

from .options import allowed_sources, parse_args, source_kind
from .startup import main

__all__ = ["allowed_sources", "main", "parse_args", "source_kind"]
