"""python -m runtime.serve [--graphs graphs/NAME] [--host 127.0.0.1] [--port 8000] [--token T] [--max-streams N]

A commentary server: the graphs are loaded once, streams are started over HTTP by other programs (or by the page
at /), every stream has its own StreamingVLM context and cache, and they take turns chunk by chunk
(runtime/sessions.py). Cues, answers and status changes go out as server-sent events and over a WebSocket, which
also takes a browser's webcam frames (runtime/push.py) and questions. The API is described in the README.
"""

import argparse
import asyncio
import hmac
import json
import math
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import WSMsgType, web

from . import stream as cli
from .commentator import Commentator
from .live import LiveEdge, kind, outage, redact
from .manifest import Manifest, ManifestError
from .providers import PROVIDERS, ProviderError
from .push import FrameError, PushedFrames
from .sessions import Scheduler, Stream
from .video import VideoError, chunk_frames

PAGE = Path(__file__).with_name("web") / "index.html"
# Per-stream settings a client may give, with their JSON types (the CLI's options of the same names).
NUMBER = (int, float)
MAX_FRAMES_PER_CHUNK, MAX_NEW_TOKENS = 16, 512  # per stream, whatever a client asks
SETTINGS = {"query": str, "previous_text": str, "system": str, "timestamps": bool, "fps": NUMBER,
            "chunk_duration": NUMBER, "max_pixels": int, "window_size": int, "text_round": int, "text_sink": int,
            "text_window": int, "keep_query": bool, "max_new_tokens": int, "answer_max_new_tokens": int,
            "temperature": NUMBER, "top_k": int, "top_p": NUMBER, "repetition_penalty": NUMBER, "seed": int,
            "start": NUMBER, "duration": NUMBER, "realtime": bool, "timeout": NUMBER, "reconnect": int}
SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "tcp", "udp", "srt", "rtp")
MAX_QUESTION = 500  # characters
MAX_PENDING = 8  # questions waiting for a chunk, per stream
MAX_PUSH_FPS = 10  # pushed frames per second beyond this are dropped (the page sends 2)
MAX_BAD_FRAMES = 20  # a socket that sends this many unusable frames is closed
KEEP_FINISHED = 64  # finished streams kept for their subtitles; older ones are deleted


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description="A live commentary server.")
    cli.add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--token", help="every request must carry it: Authorization: Bearer TOKEN (or ?token=)")
    p.add_argument("--max-streams", type=int,
                   help="streams served at once; more are refused with 503 (default: 1 on the CPU, else from a "
                        "measured step time)")
    p.add_argument("--allow-sources",
                   help="comma-separated source kinds clients may open: URL schemes (rtsp, http, ...), file (a "
                        "path on this machine), device (/dev/videoN), upload, push (default: all but file and "
                        "device when bound beyond localhost)")
    p.add_argument("--max-body", type=int, default=64 * 1024, help="bytes of a JSON request body (64 KiB)")
    p.add_argument("--max-upload", type=int, default=512, help="megabytes of an uploaded video (512)")
    p.add_argument("--max-frame", type=int, default=4 * 1024 * 1024, help="bytes of a pushed frame (4 MiB)")
    p.add_argument("--data-dir", help="where subtitles and uploads are kept (default: a temporary folder)")
    return p.parse_args(argv)


def allowed_sources(args) -> set[str]:
    if args.allow_sources is not None:
        return {s.strip().lower() for s in args.allow_sources.split(",") if s.strip()}
    local = args.host in ("127.0.0.1", "localhost", "::1")
    return {*SCHEMES, "upload", "push", *(("file", "device") if local else ())}


def source_kind(source: str) -> str:
    """The kind --allow-sources names: a URL's scheme, file, device, pipe, upload or push."""
    if source == "push" or source.startswith("upload:"):
        return source.partition(":")[0]
    where = kind(source)
    return source.partition(":")[0].lower() if where == "network" else where


class Server:
    def __init__(self, args, manifest: Manifest, model, max_streams: int, data_dir: Path):
        self.args, self.manifest, self.model = args, manifest, model
        self.max_streams, self.data_dir = max_streams, data_dir
        self.allowed = allowed_sources(args)
        self.scheduler = Scheduler()
        self.closing = False
        (data_dir / "uploads").mkdir(parents=True, exist_ok=True)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.args.max_body,
                              middlewares=[self.errors, self.same_origin, self.auth])
        app.router.add_get("/", self.page)
        app.router.add_get("/v1/streams", self.list)
        app.router.add_post("/v1/streams", self.create)
        app.router.add_post("/v1/uploads", self.upload)
        app.router.add_get("/v1/streams/{id}", self.get)
        app.router.add_delete("/v1/streams/{id}", self.delete)
        app.router.add_post("/v1/streams/{id}/stop", self.stop)
        app.router.add_get("/v1/streams/{id}/events", self.events)
        app.router.add_get("/v1/streams/{id}/commentary.{fmt}", self.download)
        app.router.add_post("/v1/streams/{id}/questions", self.question)
        app.router.add_get("/v1/streams/{id}/ws", self.socket)
        app.on_shutdown.append(self.shutdown)
        return app

    # Middlewares: every error is one JSON line; with --token, everything but the page needs the token.
    @web.middleware
    async def errors(self, request, handler):
        try:
            return await handler(request)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            message = error.text if error.content_type == "application/json" else json.dumps({"error": error.reason})
            return web.Response(status=error.status, text=message, content_type="application/json",
                                headers={k: v for k, v in error.headers.items() if k in ("WWW-Authenticate",
                                                                                         "Retry-After")})
        except Exception as error:  # a bug or a race (a download while its stream is deleted): still one JSON line
            return web.json_response({"error": f"internal error: {type(error).__name__}: {error}"}, status=500)

    @web.middleware
    async def same_origin(self, request, handler):
        """Any web page the user visits could otherwise drive this server (it answers on localhost, and without
        --token to anyone): a browser's request from another origin is refused. Clients that are not browsers
        (curl, programs) send no Origin."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.partition("://")[2].rstrip("/") != request.host:
            raise fail(web.HTTPForbidden, f"requests from other origins ({origin}) are refused")
        return await handler(request)

    @web.middleware
    async def auth(self, request, handler):
        if self.args.token and request.path != "/" and not self._authorized(request):
            raise fail(web.HTTPUnauthorized, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                       "(event streams and sockets: ?token=TOKEN)", {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    def _authorized(self, request) -> bool:
        header = request.headers.get("Authorization", "")
        offered = [header.removeprefix("Bearer ").strip(), request.query.get("token", "")]
        offered += [p.strip().removeprefix("bearer.") for p in request.headers.get("Sec-WebSocket-Protocol",
                                                                                   "").split(",")]
        return any(hmac.compare_digest(o.encode(), self.args.token.encode()) for o in offered if o)

    async def page(self, request):
        return web.FileResponse(PAGE, headers={"Cache-Control": "no-cache"})

    def find(self, request) -> Stream:
        stream = self.scheduler.get(request.match_info["id"])
        if stream is None:
            raise fail(web.HTTPNotFound, f"no stream {request.match_info['id']!r}")
        return stream

    async def list(self, request):
        streams = [s.info() for s in self.scheduler.all()]
        return web.json_response({"streams": streams, "active": self.scheduler.active(),
                                  "max_streams": self.max_streams})

    async def get(self, request):
        return web.json_response(self.find(request).info())

    async def delete(self, request):
        stream = self.find(request)
        self.scheduler.delete(stream.id)
        return web.json_response({"id": stream.id, "deleted": True})

    async def stop(self, request):
        stream = self.find(request)
        self.scheduler.stop(stream)
        return web.json_response({"id": stream.id, "stopped": True})

    async def create(self, request):
        body = await json_body(request)
        source = body.pop("source", None)
        if not isinstance(source, str) or not source:
            raise fail(web.HTTPBadRequest, "give a 'source': a URL, a file path, 'upload:ID' or 'push'")
        what = source_kind(source)
        if what not in self.allowed:
            raise fail(web.HTTPForbidden, f"sources of kind {what!r} are not allowed here (--allow-sources)")
        args = cli.parse_args(["--", source])  # a source like '-h' is a source, not an option
        for key, value in body.items():
            wanted = SETTINGS.get(key)
            if wanted is None:
                raise fail(web.HTTPBadRequest, f"unknown field {key!r}; the settings are {', '.join(SETTINGS)}")
            if not isinstance(value, wanted) or isinstance(value, bool) != (wanted is bool):
                raise fail(web.HTTPBadRequest, f"{key!r} has the wrong type")
            setattr(args, key, value)
        args.static, args.cache_capacity = self.args.static, self.args.cache_capacity
        # One stream's settings must not starve the others or the machine: frames, pixels and tokens are capped.
        if args.fps * args.chunk_duration > MAX_FRAMES_PER_CHUNK or \
                (args.max_pixels or 0) > self.manifest["preprocess"]["max_pixels"] or \
                max(args.max_new_tokens, args.answer_max_new_tokens) > MAX_NEW_TOKENS:
            raise fail(web.HTTPBadRequest, f"at most {MAX_FRAMES_PER_CHUNK} frames per chunk, the model's "
                       f"max_pixels ({self.manifest['preprocess']['max_pixels']}) and {MAX_NEW_TOKENS} new tokens")
        try:
            config = cli.config_from(args, questions=True)
        except cli.UsageError as error:
            raise fail(web.HTTPBadRequest, str(error)) from None
        folder = self.data_dir / secrets.token_hex(8)
        if what == "upload":
            upload = self.data_dir / "uploads" / source.partition(":")[2]
            if not source.partition(":")[2].isalnum() or not upload.is_file():
                raise fail(web.HTTPBadRequest, f"no upload {source!r}; POST the file to /v1/uploads first")
        elif what == "file" and not Path(source).is_file():
            raise fail(web.HTTPBadRequest, f"{source}: no such file on the server")
        self._room()
        # The tokenizer loads from disk: off the event loop. Nothing awaits between the last check and the add.
        commentator = await asyncio.get_running_loop().run_in_executor(None, Commentator, self.model, config)
        self._room()
        folder.mkdir()
        if what == "upload":
            args.video = str(shutil.move(upload, folder / "upload"))
        pushed = PushedFrames() if what == "push" else None
        stream = Stream(folder.name, redact(source), commentator, self._edge(args, pushed), folder,
                        pushed is not None or cli.is_live(args), pushed)
        self._forget_old()
        self.scheduler.add(stream)
        return web.json_response(stream.info(), status=201)

    def _room(self) -> None:
        if self.scheduler.active() >= self.max_streams:
            raise fail(web.HTTPServiceUnavailable, f"the server is busy: {self.max_streams} stream(s) at once "
                       "(--max-streams); delete one or try later", {"Retry-After": "5"})

    def _edge(self, args, pushed: PushedFrames | None) -> LiveEdge:
        """The stream's source, read in its own thread; it wakes the scheduler whenever a chunk is ready."""
        notify = self.scheduler.wake.set
        if pushed is None:  # a file is read as fast as the turns allow, every chunk, unless realtime
            return cli.live_edge(args, self.manifest, keep_all=not cli.is_live(args), notify=notify)
        chunking = cli.chunking(args, self.manifest)  # frames come over the socket, at the live edge
        return LiveEdge(lambda on_status, stop: chunk_frames(
            pushed.frames(stop), "push", chunking["resize"], args.chunk_duration, chunking["frames_per_chunk"], 0.0,
            math.inf, chunking["min_side"], None, gap=outage(args.chunk_duration)), notify=notify)

    def _forget_old(self) -> None:
        finished = sorted((s for s in self.scheduler.all() if s.finished), key=lambda s: s.created)
        for stream in finished[:max(0, len(finished) - KEEP_FINISHED + 1)]:
            self.scheduler.delete(stream.id)

    async def upload(self, request):
        limit = self.args.max_upload * 1024 * 1024
        too_large = fail(web.HTTPRequestEntityTooLarge, f"uploads are limited to {self.args.max_upload} MB "
                         "(--max-upload)")
        if (request.content_length or 0) > limit:
            raise too_large
        id = secrets.token_hex(8)
        path, size = self.data_dir / "uploads" / id, 0
        try:
            with open(path, "wb") as out:
                async for piece in request.content.iter_chunked(1 << 16):
                    size += len(piece)
                    if size > limit:  # a body without a length, or one longer than it said
                        raise too_large
                    out.write(piece)
        except BaseException:  # too large, or the client went away mid-upload: no partial file stays
            path.unlink(missing_ok=True)
            raise
        return web.json_response({"source": f"upload:{id}", "bytes": size}, status=201)

    async def question(self, request):
        stream = self.find(request)
        body = await json_body(request)
        self._ask(stream, body.get("text"))
        return web.json_response({"question": body["text"].strip(), "asked": stream.media_time}, status=202)

    def _ask(self, stream: Stream, text) -> None:
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_QUESTION:
            raise fail(web.HTTPBadRequest, f"a question is a non-empty 'text' of at most {MAX_QUESTION} characters")
        if stream.finished:
            raise fail(web.HTTPConflict, f"stream {stream.id} has {stream.state}")
        if len(stream.questions) >= MAX_PENDING:
            raise fail(web.HTTPTooManyRequests, f"{MAX_PENDING} questions are already waiting for a chunk")
        stream.ask(text.strip())

    async def download(self, request):
        stream, fmt = self.find(request), request.match_info["fmt"]
        types = {"vtt": "text/vtt", "srt": "application/x-subrip", "jsonl": "application/jsonl"}
        if fmt not in types:
            raise fail(web.HTTPNotFound, "commentary comes as .vtt, .srt or .jsonl")
        text = (stream.folder / f"commentary.{fmt}").read_text(encoding="utf-8")
        return web.Response(text=text, content_type=types[fmt], charset="utf-8", headers={
            "Content-Disposition": f'attachment; filename="commentary-{stream.id}.{fmt}"'})

    async def follow(self, stream: Stream, first: int, send) -> None:
        """Send every event from id `first` on, as they come, until the stream finishes or the server closes."""
        loop, woken = asyncio.get_running_loop(), asyncio.Event()

        def wake():
            try:
                loop.call_soon_threadsafe(woken.set)
            except RuntimeError:  # the loop has closed
                pass

        unlisten = stream.listen(wake)
        try:
            quiet = 0.0
            while not self.closing:
                woken.clear()
                done = stream.finished  # read before the events, so that the last ones are never missed
                for event in stream.since(first):
                    await send(event)
                    first, quiet = event.id + 1, 0.0
                if done:
                    return
                try:
                    await asyncio.wait_for(woken.wait(), 1.0)
                except TimeoutError:
                    quiet += 1.0
                    if quiet >= 15:  # a comment line keeps proxies from closing a quiet event stream
                        await send(None)
                        quiet = 0.0
        finally:
            unlisten()

    async def events(self, request):
        stream = self.find(request)
        try:
            first = int(request.headers.get("Last-Event-ID", request.query.get("after", -1))) + 1
        except ValueError:
            raise fail(web.HTTPBadRequest, "Last-Event-ID must be an event id") from None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)

        async def send(event):
            if event is None:
                await response.write(b": keep-alive\n\n")
            else:
                data = json.dumps(event.data, ensure_ascii=False)
                await response.write(f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode())

        try:
            await self.follow(stream, first, send)
        except ConnectionError:  # the client went away
            pass
        return response

    async def socket(self, request):
        stream = self.find(request)
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        ws = web.WebSocketResponse(max_msg_size=self.args.max_frame, heartbeat=20,
                                   protocols=[p for p in offered if p.startswith("bearer.")][:1])
        await ws.prepare(request)

        async def send(event):
            if event is not None:
                await ws.send_json({"type": event.type, "event_id": event.id, **event.data})

        sender = asyncio.create_task(self.follow(stream, 0, send))
        bad, recent, fed = 0, [], False
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    now = time.monotonic()
                    recent = [t for t in recent if now - t < 1.0] + [now]
                    reason = None
                    if stream.pushed is None:
                        reason = "this stream's source is not pushed frames (create it with source 'push')"
                    elif len(recent) > MAX_PUSH_FPS:
                        dropped = "flood"
                    else:
                        try:
                            dropped = None if stream.pushed.push(message.data) else "busy"
                            fed = True
                        except FrameError as error:
                            reason = str(error)
                    if reason is not None:
                        bad += 1
                        await ws.send_json(error_event("invalid_frame", reason))
                        if bad >= MAX_BAD_FRAMES:
                            await ws.close(code=1008, message=b"too many unusable frames")
                            break
                    elif dropped:
                        stream.frames_dropped += 1
                        await ws.send_json({"type": "input_frame.dropped", "reason": dropped,
                                            "frames_dropped": stream.frames_dropped})
                elif message.type == WSMsgType.TEXT:
                    await self._socket_text(stream, ws, message.data)
        finally:
            sender.cancel()
            if fed:  # the client that feeds the stream is gone: the stream ends (a watcher leaving changes nothing)
                stream.pushed.close()
        return ws

    async def _socket_text(self, stream: Stream, ws, data: str) -> None:
        """A question: {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content":
        [{"type": "input_text", "text": ...}]}} as in the OpenAI Realtime API, or {"type": "question", "text": ...}."""
        try:
            message = json.loads(data)
            if message.get("type") == "question":
                text = message.get("text")
            elif message.get("type") == "conversation.item.create":
                text = "".join(c.get("text", "") for c in message["item"]["content"] if c.get("type") == "input_text")
            else:
                await ws.send_json(error_event("unknown_event", f"unknown event type {message.get('type')!r}"))
                return
            self._ask(stream, text)
        except web.HTTPException as error:
            await ws.send_json(error_event("invalid_question", json.loads(error.text)["error"]))
        except (ValueError, AttributeError, KeyError, TypeError):
            await ws.send_json(error_event("invalid_event", "a text message is one JSON event"))

    async def shutdown(self, app) -> None:
        self.closing = True


def fail(kind: type, message: str, headers: dict | None = None) -> web.HTTPException:
    size = (0,) if kind is web.HTTPRequestEntityTooLarge else ()  # its one required argument; the text says it
    return kind(*size, text=json.dumps({"error": message}), content_type="application/json", headers=headers)


def error_event(code: str, message: str) -> dict:
    return {"type": "error", "error": {"type": "invalid_request_error", "code": code, "message": message}}


async def json_body(request) -> dict:
    """The request's JSON object; the app's client_max_size (--max-body) bounds what is read."""
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise fail(web.HTTPRequestEntityTooLarge, "the request body is too large (--max-body)") from None
    except ValueError:
        raise fail(web.HTTPBadRequest, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise fail(web.HTTPBadRequest, "the body must be a JSON object")
    return body


def measured_max_streams(model, manifest: Manifest, args) -> int:
    """How many streams of 1 s chunks a GPU keeps up with: one over the time of a steady 640x360 step (the
    second of three), with a fifth of headroom. The CPU serves one: its step already uses every core."""
    import numpy as np

    from .video import Chunk

    if model.providers[0] == PROVIDERS["cpu"]:
        return 1
    defaults = cli.parse_args(["push"])
    defaults.static = args.static
    commentator = Commentator(model, cli.config_from(defaults))
    height, width = cli.chunking(defaults, manifest)["resize"](360, 640)
    times = []
    for index in range(3):
        frames = np.zeros((2, height, width, 3), np.uint8)
        began = time.perf_counter()
        commentator.step(Chunk(index, index, index + 1, frames))
        times.append(time.perf_counter() - began)
    return max(1, int(0.8 / times[1]))


async def serve(args) -> None:
    from .model import Model

    if args.max_streams is not None and args.max_streams < 1 or min(args.max_body, args.max_upload,
                                                                     args.max_frame) < 1:
        raise cli.UsageError("--max-streams, --max-body, --max-upload and --max-frame must be >= 1")
    manifest = Manifest.load(cli.find_graphs(args.graphs))
    providers, options = cli.session_setup(args)
    model = Model(manifest, providers, args.threads, options)
    max_streams = args.max_streams or measured_max_streams(model, manifest, args)
    if not args.token and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: {args.host} without --token: anyone who reaches this port can make the server open URLs "
              "and use its model", file=sys.stderr, flush=True)
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="qwen3vl-serve-") if temporary else args.data_dir)
    server = Server(args, manifest, model, max_streams, data_dir)
    runner = web.AppRunner(server.app(), shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"serving http://{host if ':' not in host else f'[{host}]'}:{port}/ (graphs {manifest.root}, "
              f"{providers[0]}, at most {max_streams} stream(s); sources: {', '.join(sorted(server.allowed))})",
              file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        server.closing = True
        await runner.cleanup()
        server.scheduler.close()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(serve(args))
    except (ManifestError, ProviderError, cli.UsageError, VideoError) as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. the port is taken
        print(f"error: {error.strerror or error}", file=sys.stderr)
        return 1
    print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
